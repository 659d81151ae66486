"""Putting checked settings into effect on the device: config, broker accounts, Wi-Fi, host name, SSH keys.

Every path is under ``root`` (``/`` on a device, a scratch tree in tests). Files are replaced by writing a sibling
and renaming it, so a power cut leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from appliance.firstboot.settings import SERVICE_USER, Settings, Wifi, dumps, merged
from appliance.release import safefs

ADMIN_USER = "admin"
CONFIG = "etc/appliance/appliance.toml"
SERVICE_PASSWORD = "etc/appliance/mqtt-password"  # noqa: S105 (a path)
API_KEY = "etc/appliance/api-key"
PASSWD = "etc/mosquitto/appliance.passwd"  # noqa: S105 (a path)
WIFI = "etc/NetworkManager/system-connections/appliance-wifi.nmconnection"


def write_file(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace a file durably (written, fsynced, renamed, directory fsynced) without following a link planted
    where it goes: first boot runs as root and writes into /var/lib/appliance, which the service's account owns."""
    safefs.write_file(path, text, mode, owner)


def ids(root: Path, user: str | None = None, group: str | None = None) -> tuple[int, int] | None:
    """(uid, gid) from the tree's own passwd/group files (not the host's); None when not there."""
    def lookup(file: str, name: str) -> tuple[int, int] | None:
        path = root / "etc" / file
        for line in path.read_text().splitlines() if path.is_file() else ():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3]) if file == "passwd" else int(fields[2])
        return None
    if user is not None:
        return lookup("passwd", user)
    found = lookup("group", group) if group is not None else None
    return (0, found[0]) if found else None


def write_config(root: Path, settings: Settings) -> None:
    sections = dict(settings.config)
    if settings.api_key is not None:
        write_file(root / API_KEY, settings.api_key + "\n", 0o640, ids(root, group=SERVICE_USER))
        sections.setdefault("http", {})["api_key_file"] = f"/{API_KEY}"
    write_file(root / CONFIG, dumps(merged(root / CONFIG, sections)))


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
    applying the same accounts twice changes nothing. Returns (the accounts now in the file, whether it changed)."""
    path = root / PASSWD
    before = path.read_text() if path.is_file() else ""
    existing = dict(line.split(":", 1) for line in before.splitlines() if ":" in line)
    accounts = {name: hashed for name, hashed in existing.items()
                if name == SERVICE_USER or (name not in users and not exact)}
    wanted = {name: password for name, password in users.items() if password}
    if SERVICE_USER not in accounts:
        wanted[SERVICE_USER] = service_password(root)
    for name, password in wanted.items():
        if name in existing and password_matches(existing[name], password):
            accounts[name] = existing[name]
    accounts.update(_hash({n: p for n, p in wanted.items() if n not in accounts}))
    text = "".join(f"{n}:{h}\n" for n, h in sorted(accounts.items()))
    if text != before:
        write_file(path, text, 0o640, ids(root, group="mosquitto"))
    return sorted(accounts), text != before


def password_matches(hashed: str, password: str) -> bool:
    """Whether a mosquitto 2 password hash (``$7$<iterations>$<salt>$<PBKDF2-SHA512>``) is of ``password``."""
    parts = hashed.strip().split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), dklen=len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def _hash(plain: dict[str, str]) -> dict[str, str]:
    """mosquitto's own password hashing (``mosquitto_passwd -U`` on a scratch file): no password on a command line."""
    if not plain:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "passwd"
        scratch.write_text("".join(f"{n}:{p}\n" for n, p in plain.items()))
        scratch.chmod(0o600)
        subprocess.run(["mosquitto_passwd", "-U", str(scratch)], check=True, capture_output=True)
        return dict(line.split(":", 1) for line in scratch.read_text().splitlines() if ":" in line)


def _keyfile_value(text: str) -> str:
    """A value as GLib's key files (NetworkManager's keyfiles) read it back: backslashes, line breaks, tabs and
    a leading space escaped."""
    out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return "\\s" + out[1:] if out.startswith(" ") else out


def write_wifi(root: Path, wifi: Wifi) -> None:
    """A NetworkManager keyfile (root-only: it holds the passphrase)."""
    lines = ["[connection]", "id=appliance-wifi", f"uuid={uuid.uuid5(uuid.NAMESPACE_DNS, 'wifi.' + wifi.ssid)}",
             "type=wifi", "autoconnect=true", "", "[wifi]", "mode=infrastructure", f"ssid={_keyfile_value(wifi.ssid)}",
             f"hidden={'true' if wifi.hidden else 'false'}", ""]
    if wifi.psk:
        lines += ["[wifi-security]", "key-mgmt=wpa-psk", f"psk={_keyfile_value(wifi.psk)}", ""]
    lines += ["[ipv4]", "method=auto", "", "[ipv6]", "method=auto", ""]
    write_file(root / WIFI, "\n".join(lines), 0o600)
    if wifi.country:  # the regulatory domain, read by cfg80211 when it loads (next boot)
        write_file(root / "etc/modprobe.d/appliance-wifi-country.conf",
                   f"options cfg80211 ieee80211_regdom={wifi.country}\n")


def set_hostname(root: Path, name: str, live: bool) -> None:
    write_file(root / "etc/hostname", name + "\n")
    hosts = root / "etc/hosts"
    lines = [line for line in (hosts.read_text().splitlines() if hosts.is_file() else ["127.0.0.1\tlocalhost"])
             if not line.startswith("127.0.1.1")]
    write_file(hosts, "\n".join([*lines, f"127.0.1.1\t{name}"]) + "\n")
    if live:
        socket.sethostname(name)  # systemd read /etc/hostname long before this ran


IMAGE_HOSTNAME = "appliance"


def unique_hostname(root: Path) -> str | None:
    """``appliance-<machine id>`` while the host name is still the image's; None once it is the device's own."""
    current = (root / "etc/hostname").read_text().strip() if (root / "etc/hostname").is_file() else ""
    machine_id = (root / "etc/machine-id").read_text().strip() if (root / "etc/machine-id").is_file() else ""
    if current != IMAGE_HOSTNAME or not machine_id:
        return None
    return f"{IMAGE_HOSTNAME}-{machine_id[:6]}"


def write_authorized_keys(root: Path, keys: list[str]) -> None:
    owner = ids(root, user=ADMIN_USER)
    home = root / "home" / ADMIN_USER
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None:
        for path in (home, ssh):
            os.chown(path, *owner, follow_symlinks=False)
    write_file(ssh / "authorized_keys", "\n".join(keys) + "\n", 0o600, owner)


def ensure_host_keys(root: Path) -> list[str]:
    """This device's own SSH host keys (the image ships none, so no two devices share one). Ed25519 and ECDSA:
    an RSA key would take tens of seconds on an emulated or slow CPU and is not needed by current clients."""
    made = []
    for kind in ("ed25519", "ecdsa"):
        key = root / "etc" / "ssh" / f"ssh_host_{kind}_key"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", str(key)], check=True)
            made.append(kind)
    return made


def grow_root() -> str:
    """Grow the root partition and its ext4 to the end of the card (online; a no-op once done)."""
    source = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True).stdout.strip()
    real = os.path.realpath(source)
    disk = subprocess.run(["lsblk", "-no", "PKNAME", real], capture_output=True, text=True).stdout.strip()
    number = Path(f"/sys/class/block/{Path(real).name}/partition")
    if not disk or not number.is_file():
        return f"root {source}: not a partition, nothing to grow"
    grown = subprocess.run(["growpart", f"/dev/{disk}", number.read_text().strip()], capture_output=True, text=True)
    if grown.returncode not in (0, 1):  # 1: NOCHANGE
        return f"growpart failed: {(grown.stdout + grown.stderr).strip()}"
    resized = subprocess.run(["resize2fs", real], capture_output=True, text=True)
    if resized.returncode != 0:
        return f"resize2fs {real} failed: {(resized.stdout + resized.stderr).strip()}"
    return (grown.stdout.strip() or "root partition already fills the disk").splitlines()[-1]
