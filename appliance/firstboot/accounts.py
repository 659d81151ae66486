"""The broker's accounts: checking names and passwords, hashing them as mosquitto does, and the password file.

Used by first boot (``[mqtt_users]`` on the boot partition) and by ``appliance mqtt-users`` (the Ansible role).
Hashes are made here, in mosquitto 2's own format, rather than by ``mosquitto_passwd -U`` on a scratch file of
``name:password`` lines: that tool reads a password up to the next ':' and trims white space around it, so it
hashed something other than what the sensor will send, and a line break in a password added lines of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from appliance.config.credentials import SERVICE_USER, account_problems
from appliance.firstboot.apply import ids, write_file

SERVICE_PASSWORD = "etc/appliance/mqtt-password"  # noqa: S105 (a path)
PASSWD = "etc/mosquitto/appliance.passwd"  # noqa: S105 (a path)
#: what mosquitto_passwd 2.0 uses: PBKDF2-SHA512, 101 iterations, a 12-byte salt
ITERATIONS, SALT_BYTES = 101, 12


def service_password(root: Path) -> str:
    """The appliance's own broker password: made once per device, readable by the service's group only."""
    path = root / SERVICE_PASSWORD
    if path.is_file() and (existing := path.read_text().strip()):
        return existing
    password = secrets.token_urlsafe(24)
    write_file(path, password + "\n", 0o640, ids(root, group=SERVICE_USER))
    return password


def set_mqtt_users(root: Path, users: dict[str, str], exact: bool = False) -> tuple[list[str], bool]:
    """Create, change or ("" as password) remove broker accounts; with ``exact``, the operator accounts are just
    these. The service's own account is always kept. An account whose password is unchanged keeps its hash, so
    applying the same accounts twice changes nothing. Returns (the accounts now in the file, whether it changed).
    Raises ValueError naming the accounts (never the passwords) when a name or a password is not allowed."""
    if problems := account_problems(users, "mqtt_users"):
        raise ValueError("; ".join(problems))
    path = root / PASSWD
    before = path.read_text() if path.is_file() else ""
    existing = dict(line.split(":", 1) for line in before.splitlines() if ":" in line)
    accounts = {name: hashed for name, hashed in existing.items()
                if name == SERVICE_USER or (name not in users and not exact)}
    wanted = {name: password for name, password in users.items() if password}
    if SERVICE_USER not in accounts:
        wanted[SERVICE_USER] = service_password(root)
    for name, password in wanted.items():
        if name not in accounts:
            same = name in existing and password_matches(existing[name], password)
            accounts[name] = existing[name] if same else hash_password(password)
    text = "".join(f"{n}:{h}\n" for n, h in sorted(accounts.items()))
    if text != before:
        write_file(path, text, 0o640, ids(root, group="mosquitto"))
    return sorted(accounts), text != before


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A mosquitto 2 password hash: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``, base64 as mosquitto writes it."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_matches(hashed: str, password: str) -> bool:
    """Whether a mosquitto 2 password hash is of ``password``."""
    parts = hashed.strip().split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), dklen=len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)
