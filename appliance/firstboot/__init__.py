"""`appliance firstboot`: make the device its own, and apply the settings an operator left on the boot partition.

Runs as root from ``appliance-firstboot.service`` on every boot, before the broker, SSH, NetworkManager and the
appliance start:

- once per device: its own SSH host keys, its own broker password, a host name of its own (``appliance-`` and
  the start of its machine id, so the default device ids of a fleet differ), the root grown to fill the card;
- whenever the boot partition holds ``appliance.toml``, ``authorized_keys`` or ``hostname``: they are checked as a
  whole, applied, and retired as ``<name>.applied`` with every secret blanked (passwords live on in /etc only);
- a config from before API keys were needed on the network (an earlier image served 0.0.0.0 without one) is
  brought back to loopback, so the new release starts instead of refusing it.

A file with a problem is applied not at all (the others are): the device boots with the settings it had, the
problems go to the console and to ``<state>/firstboot.json``, and the appliance shows them as warnings in its
status until a good file replaces the bad one. It never stops the boot.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from appliance.firstboot import accounts, apply
from appliance.firstboot.settings import SETTINGS_FILE, Settings, read

log = logging.getLogger(__name__)

REPORT = "firstboot.json"
INITIALIZED = ".device-initialized"
REDACTED = "(applied; see /etc on the device)"


def problems(state_dir: Path) -> list[str]:
    """What the last first-boot run could not apply, for the appliance's status warnings."""
    try:
        report = json.loads((state_dir / REPORT).read_text())
    except (OSError, ValueError):
        return []
    found = report.get("problems") or []
    return [f"boot partition settings not applied: {p}" for p in found if isinstance(p, str)]


def run(boot: Path, root: Path = Path("/"), state_dir: Path = Path("/var/lib/appliance"),
        live: bool = True) -> dict[str, Any]:
    """One first-boot pass; ``live`` also acts on the running system (host name, growing the root)."""
    report: dict[str, Any] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": [], "applied": [], "problems": []}
    if not _initialized(state_dir):
        report["device"] += [f"ssh host key {k}" for k in apply.ensure_host_keys(root)]
        accounts.set_mqtt_users(root, {})  # the service's own account
        if (name := apply.unique_hostname(root)) is not None:
            apply.set_hostname(root, name, live)
            report["device"].append(f"hostname {name}")
        if live:
            report["device"].append(apply.grow_root())
        apply.write_file(state_dir / INITIALIZED, report["at"] + "\n")
    if (closed := apply.close_keyless_api(root)) is not None:
        report["device"].append(closed)
    settings, report["problems"] = read(boot, root / apply.CONFIG, root)
    if not settings.empty:
        report["applied"] = _apply(settings, root, live)
        _retire(settings)
    _write_report(state_dir, report)
    return report


def _initialized(state_dir: Path) -> bool:
    """Whether this device made its keys already (a link in its place counts, and is not followed)."""
    return os.path.lexists(state_dir / INITIALIZED)


def _apply(settings: Settings, root: Path, live: bool) -> list[str]:
    done = []
    if settings.config or settings.api_key is not None:
        apply.write_config(root, settings)
        key = {None: "", "": " (API key removed)"}.get(settings.api_key, " (API key set)")
        done.append("config: " + ", ".join(sorted(settings.config)) + key)
    if settings.mqtt_users:
        accounts.set_mqtt_users(root, settings.mqtt_users)
        done.append("broker accounts: " + ", ".join(sorted(settings.mqtt_users)))
    if settings.wifi is not None:
        apply.write_wifi(root, settings.wifi)
        done.append(f"wi-fi: {settings.wifi.ssid}")
    if settings.hostname is not None:
        apply.set_hostname(root, settings.hostname, live)
        done.append(f"hostname: {settings.hostname}")
    if settings.authorized_keys is not None:
        apply.write_authorized_keys(root, settings.authorized_keys)
        done.append(f"ssh keys for {apply.ADMIN_USER}: {len(settings.authorized_keys)}")
    return done


def _retire(settings: Settings) -> None:
    """Rename what was applied, blanking secrets in the settings file, so it is not applied again."""
    for path in settings.files:
        retired = path.with_name(path.name + ".applied")
        if path.name == SETTINGS_FILE:
            retired.write_text(_redacted(path))
            _wipe(path)
            path.unlink()
        else:
            path.replace(retired)
    os.sync()  # the FAT partition: a power cut right after boot must not bring the secrets back


def _wipe(path: Path) -> None:
    """Overwrite the file where it lies before it is deleted: FAT frees clusters without clearing them, and a
    card read in any laptop would still show the passwords."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def _redacted(path: Path) -> str:
    from appliance.firstboot.settings import dumps
    data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    for name in data.get("mqtt_users", {}):
        data["mqtt_users"][name] = REDACTED
    if "psk" in data.get("wifi", {}):
        data["wifi"]["psk"] = REDACTED
    if data.get("http", {}).get("api_key"):
        data["http"]["api_key"] = REDACTED
    return dumps(data, header="Applied by appliance-firstboot at the boot that found it; secrets blanked.\n"
                              "To change settings, put a new appliance.toml here.")


def _write_report(state_dir: Path, report: dict[str, Any]) -> None:
    apply.write_file(state_dir / REPORT, json.dumps(report, indent=2) + "\n")
    for line in report["device"]:
        log.info("device: %s", line)
    for line in report["applied"]:
        log.info("applied %s", line)
    for line in report["problems"]:
        log.error("NOT APPLIED: %s", line)
