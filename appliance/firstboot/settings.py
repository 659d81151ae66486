"""What an operator puts on the SD card's FAT partition, read and checked as a whole before anything is applied.

    appliance.toml     the appliance's config sections (docs/config.md), plus [mqtt_users], [wifi], http.api_key
                       (a key opens the HTTP API to the network, bind 0.0.0.0, unless the file sets http.bind;
                       "" removes the key and serves this device only again)
    authorized_keys    SSH public keys for the `admin` account
    hostname           one line

Every problem is collected and named (file, key, and the value unless it may be a secret), so one boot tells the
operator everything to fix. Problems go to the console, firstboot.json and the retained MQTT status, so passwords,
keys and anything outside a table are named, never shown.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import toml_text
from appliance.config.credentials import account_problems, api_key_problem, control_character
from appliance.config.loader import load_config
from appliance.errors import ConfigError

SETTINGS_FILE = "appliance.toml"
KEYS_FILE = "authorized_keys"
HOSTNAME_FILE = "hostname"
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_COUNTRY = re.compile(r"[A-Z]{2}")
_PASSPHRASE = re.compile(r"[ -~]{8,63}")  # WPA: 8-63 printable ASCII characters
OPEN_BIND, LOOPBACK_BIND = "0.0.0.0", "127.0.0.1"  # noqa: S104 (an API key is what opens it)


@dataclass(frozen=True)
class Wifi:
    ssid: str
    psk: str  # empty: an open network
    country: str = ""
    hidden: bool = False


@dataclass
class Settings:
    # sections merged into /etc/appliance/appliance.toml
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    mqtt_users: dict[str, str] = field(default_factory=dict)  # name -> password; "" removes the account
    wifi: Wifi | None = None
    api_key: str | None = None  # "" removes the key
    hostname: str | None = None
    authorized_keys: list[str] | None = None
    files: list[Path] = field(default_factory=list)  # what was read, to be retired once applied

    @property
    def empty(self) -> bool:
        return not self.files


def read(boot: Path, current_config: Path, root: Path = Path("/")) -> tuple[Settings, list[str]]:
    """The settings of the boot partition's files that check out, and the problems of those that do not.

    Each file stands or falls as a whole, on its own: a mistake in appliance.toml does not hold back the SSH keys
    that let an operator log in and look. The config is validated as it will be once merged into the device's
    current one (whose absolute paths are taken under ``root``)."""
    settings, problems = Settings(), []

    def take(path: Path, reader: Callable[[Path, Settings, list[str]], None]) -> None:
        mine: list[str] = []
        candidate = Settings()
        reader(path, candidate, mine)
        if mine:
            problems.extend(mine)
            return
        for name in ("config", "mqtt_users", "wifi", "api_key", "hostname", "authorized_keys"):
            if getattr(candidate, name) not in (None, {}, []):
                setattr(settings, name, getattr(candidate, name))
        settings.files.append(path)

    if (path := boot / SETTINGS_FILE).is_file():
        take(path, lambda p, into, mine: _read_toml(p, current_config, root, into, mine))
    if (path := boot / HOSTNAME_FILE).is_file():
        take(path, _read_hostname)
    if (path := boot / KEYS_FILE).is_file():
        take(path, lambda p, into, mine: setattr(into, "authorized_keys", _read_keys(p, mine)))
    return settings, problems


def _read_hostname(path: Path, settings: Settings, problems: list[str]) -> None:
    name = _text(path, problems).strip()
    if not _HOSTNAME.fullmatch(name):
        problems.append(f"{HOSTNAME_FILE}: {name!r} is not a host name (letters, digits and '-', 1-63 "
                        f"characters, not starting or ending with '-')")
    settings.hostname = name


def _text(path: Path, problems: list[str]) -> str:
    try:
        # utf-8-sig: editors on other systems like to start a file with a byte-order mark
        return path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        problems.append(f"{path.name}: not UTF-8 text")
        return ""


def _read_toml(path: Path, current_config: Path, root: Path, settings: Settings, problems: list[str]) -> None:
    try:
        data = tomllib.loads(_text(path, problems))
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{SETTINGS_FILE}: not valid TOML: {exc}")
        return
    users = data.pop("mqtt_users", {})
    if not isinstance(users, dict):
        problems.append(f"{SETTINGS_FILE}: [mqtt_users] must be a table of name = \"password\"")
        users = {}
    problems += [f"{SETTINGS_FILE}: {p}" for p in account_problems(users, "mqtt_users")]
    settings.mqtt_users = dict(users)
    if "wifi" in data:
        settings.wifi = _read_wifi(data.pop("wifi"), problems)
    http = data.get("http", {})
    if isinstance(http, dict) and "api_key" in http:
        key = http.pop("api_key")
        if key != "" and (reason := api_key_problem(key)) is not None:
            problems.append(f"{SETTINGS_FILE}: http.api_key: {reason} (\"\" removes the key)")
        else:
            settings.api_key = key
            http.setdefault("bind", OPEN_BIND if key else LOOPBACK_BIND)
    for section, values in data.items():
        if not isinstance(values, dict):  # the value is not shown: a secret put in the wrong place, perhaps
            problems.append(f"{SETTINGS_FILE}: {section}: expected a [{section}] table, found a value outside "
                            f"any table (not shown)")
    settings.config = {k: v for k, v in data.items() if isinstance(v, dict)}
    checked = merged(current_config, settings.config)
    problems += [f"{SETTINGS_FILE}: {p}" for p in check_config(checked, root, settings.api_key)]


def _read_wifi(raw: object, problems: list[str]) -> Wifi | None:
    if not isinstance(raw, dict):
        problems.append(f"{SETTINGS_FILE}: [wifi] must be a table (ssid, psk, country, hidden)")
        return None
    unknown = sorted(set(raw) - {"ssid", "psk", "country", "hidden"})
    if unknown:
        problems.append(f"{SETTINGS_FILE}: wifi.{unknown[0]}: unknown key (known: ssid, psk, country, hidden)")
    ssid, psk, country = raw.get("ssid"), raw.get("psk", ""), raw.get("country", "")
    if not isinstance(ssid, str) or not 1 <= len(ssid.encode()) <= 32 or control_character(ssid):
        problems.append(f"{SETTINGS_FILE}: wifi.ssid must be 1-32 bytes of text without control characters")
    if not isinstance(psk, str) or (psk and not _PASSPHRASE.fullmatch(psk)):
        problems.append(f"{SETTINGS_FILE}: wifi.psk must be a passphrase of 8-63 printable ASCII characters "
                        f"(\"\" for an open network)")
    if not isinstance(country, str) or (country and not _COUNTRY.fullmatch(country)):
        problems.append(f"{SETTINGS_FILE}: wifi.country = {country!r}: a two-letter country code such as \"GB\"")
    if not isinstance(raw.get("hidden", False), bool):
        problems.append(f"{SETTINGS_FILE}: wifi.hidden must be true or false")
    if not isinstance(ssid, str) or any(p.startswith(f"{SETTINGS_FILE}: wifi.") or "[wifi]" in p for p in problems):
        return None
    return Wifi(ssid=ssid, psk=psk, country=country, hidden=raw.get("hidden", False))


def _read_keys(path: Path, problems: list[str]) -> list[str]:
    text = _text(path, problems)
    if "PRIVATE KEY" in text or "Private-Lines" in text:  # OpenSSH/PEM, PuTTY: not a line of it may be shown
        problems.append(f"{KEYS_FILE}: holds a private key (not shown); put the public key here (the .pub file), "
                        f"and delete the private key from this card")
        return []
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        problems.append(f"{KEYS_FILE}: holds no key")
    for number, key in enumerate(keys, 1):
        with tempfile.NamedTemporaryFile("w", suffix=".pub") as one:
            one.write(key + "\n")
            one.flush()
            result = subprocess.run(["ssh-keygen", "-l", "-f", one.name], capture_output=True, text=True)
        if result.returncode != 0:
            kind = key.split()[0] if re.fullmatch(r"[a-z0-9@.-]{3,40}", key.split()[0]) else "not shown"
            problems.append(f"{KEYS_FILE}: key {number} ({kind}) is not an SSH public key")
    return keys


def merged(current_config: Path, sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The config on the device with the new sections' keys laid over it."""
    base: dict[str, dict[str, Any]] = {}
    if current_config.is_file():
        base = tomllib.loads(current_config.read_text(encoding="utf-8"))
    out = {section: dict(values) for section, values in base.items()}
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


def with_api_key(sections: dict[str, dict[str, Any]], api_key: str | None, key_file: str) -> dict[str, dict[str, Any]]:
    """The config once an API key from the settings is in place: ``http.api_key_file`` names ``key_file`` (a key)
    or is gone ("" removes the key); unchanged for None."""
    if api_key is None:
        return sections
    out = {section: dict(values) for section, values in sections.items()}
    http = out.setdefault("http", {})
    if api_key:
        http["api_key_file"] = key_file
    else:
        http.pop("api_key_file", None)
    return out


CONFIG_HEADER = ("Written by appliance-firstboot from the boot partition's appliance.toml; edit here or drop a new\n"
                 "appliance.toml on the boot partition (its keys are laid over these at the next boot).")


def dumps(sections: dict[str, dict[str, Any]], header: str = CONFIG_HEADER) -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    for section, values in sections.items():
        lines += ["", *toml_text.table(section, values)]
    return "\n".join(lines) + "\n"


def check_config(sections: dict[str, dict[str, Any]], root: Path = Path("/"), api_key: str | None = None) -> list[str]:
    """Every problem the appliance would refuse to start with, in its own words (key and value named), once the
    settings' ``api_key`` (if any) is in place."""
    if root != Path("/"):  # a scratch tree: the files the config names are under it
        sections = {name: {k: str(root / v.lstrip("/")) if isinstance(v, str) and v.startswith("/") else v
                           for k, v in values.items()} for name, values in sections.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if api_key:
            (Path(tmp) / "api-key").write_text(api_key + "\n")
        sections = with_api_key(sections, api_key, str(Path(tmp) / "api-key"))
        path = Path(tmp) / "appliance.toml"
        try:
            path.write_text(dumps(sections), encoding="utf-8")
        except (TypeError, ValueError) as exc:
            return [f"cannot be written back as TOML: {exc}"]
        try:
            load_config(path, env={})
        except ConfigError as exc:
            return list(exc.problems)
    return []
