"""A device's file tree in a scratch directory, for `appliance firstboot --root`: the boot partition, the root with
the image's own config, the state directory; and a real mosquitto that uses the password file first boot wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.transports.broker import Mosquitto, free_port
from tests.support.harness import REPO, run_cli

IMAGE_CONFIG = REPO / "image/overlay/etc/appliance/appliance.toml"
SERVICE_GID = 4321  # the `appliance` group in the scratch tree's /etc/group


def scratch_device(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(boot, root, state) as on a freshly flashed card."""
    boot, root, state = tmp_path / "boot", tmp_path / "root", tmp_path / "state"
    for d in (boot, root / "etc" / "appliance", root / "opt/appliance/current/models", state):
        d.mkdir(parents=True)
    shutil.copy(IMAGE_CONFIG, root / "etc" / "appliance" / "appliance.toml")  # what the image ships
    (root / "opt/appliance/current/models/catalog.toml").write_text("")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tappliance\n")
    (root / "etc" / "group").write_text(f"appliance:x:{SERVICE_GID}:\n")
    return boot, root, state


def firstboot(boot: Path, root: Path, state: Path):
    return run_cli("firstboot", "--boot", str(boot), "--root", str(root), "--state-dir", str(state))


def device_broker(tmp_path: Path, root: Path) -> Mosquitto:
    """A real mosquitto with the password file first boot wrote and the ACL the image ships."""
    shutil.copy(REPO / "systemd" / "mosquitto" / "appliance.acl", tmp_path / "acl")
    broker = Mosquitto(tmp_path / "broker", free_port(), persistence=False, extra="\n".join([
        "allow_anonymous false", f"password_file {root / 'etc/mosquitto/appliance.passwd'}",
        f"acl_file {tmp_path / 'acl'}"]))
    broker.start()
    return broker
