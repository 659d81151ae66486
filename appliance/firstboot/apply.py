"""Putting checked settings into effect on the device: config, broker accounts, Wi-Fi, host name, SSH keys.

Every path is under ``root`` (``/`` on a device, a scratch tree in tests). Files are replaced by writing a sibling
and renaming it, so a power cut leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib
import uuid
from pathlib import Path

from appliance.config.credentials import SERVICE_USER
from appliance.config.loader import is_loopback
from appliance.firstboot.settings import LOOPBACK_BIND, Settings, Wifi, dumps, merged, with_api_key
from appliance.release import safefs

ADMIN_USER = "admin"
CONFIG = "etc/appliance/appliance.toml"
API_KEY = "etc/appliance/api-key"
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
    """Lay the settings' sections over the device's config; an API key goes to its own file (the service's group
    may read it), and "" as the key removes it."""
    sections = with_api_key(merged(root / CONFIG, settings.config), settings.api_key, f"/{API_KEY}")
    if settings.api_key:
        write_file(root / API_KEY, settings.api_key + "\n", 0o640, ids(root, group=SERVICE_USER))
    write_file(root / CONFIG, dumps(sections))
    if settings.api_key == "":
        (root / API_KEY).unlink(missing_ok=True)


def close_keyless_api(root: Path) -> str | None:
    """Bind the HTTP API to loopback when the config serves the network without a key or the operator's opt-in
    (what images before API keys shipped); what was done, or None."""
    path = root / CONFIG
    if not path.is_file():
        return None
    sections = tomllib.loads(path.read_text(encoding="utf-8"))
    http = sections.get("http", {})
    bind = http.get("bind", LOOPBACK_BIND)
    if http.get("api_key_file") or http.get("allow_anonymous") or http.get("enabled") is False or is_loopback(bind):
        return None
    http["bind"] = LOOPBACK_BIND
    write_file(path, dumps(sections))
    return (f"HTTP API: http.bind was {bind!r} with no API key; now {LOOPBACK_BIND} (this device only). Put "
            f"[http] api_key in appliance.toml on the boot partition to serve the network")


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
