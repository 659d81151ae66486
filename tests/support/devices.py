"""Appliance images as devices for the system tests: cards written from an image, and SSH into a booted one."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from tests.support.harness import MqttClient

SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


def new_card(image: Path, path: Path, spare_mib: int = 768, *, power_of_two: bool = False) -> Path:
    """A fresh 'SD card' with the image written to it, bigger than the image (root grows into the rest);
    ``power_of_two`` for QEMU's Pi, whose SD card model takes only such sizes."""
    from image import disk, raspi
    subprocess.run(["cp", "--sparse=always", str(image), str(path)], check=True)
    size = image.stat().st_size + spare_mib * 2**20
    disk.grow(path, (raspi.card_size(size) if power_of_two else size) // 2**20)
    return path


def _ssh(vm, key: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-i", str(key), "-p", str(vm.ports[22]), *SSH_OPTIONS, "admin@127.0.0.1", command],
                          capture_output=True, text=True, timeout=timeout)


def ssh(vm, key: Path, command: str, timeout: float = 60) -> str:
    """Run a command on a booted image as `admin` (keys only, as on a real device); its output."""
    result = _ssh(vm, key, command, timeout)
    assert result.returncode == 0, f"ssh {command!r}: {result.stderr}"
    return result.stdout


def power_off(vm, key: Path, timeout: float = 120) -> int:
    """Shut a booted image down cleanly, as an operator would, and wait for it to switch itself off.

    The shutdown stops sshd, which may close the session before ssh has read the command's exit status
    (ssh then exits 255, "closed by remote host"): that is the shutdown under way, not a failure. What is
    checked is that the guest then powers off by itself.
    """
    result = _ssh(vm, key, "sudo systemctl poweroff --no-block", timeout=60)
    assert result.returncode in (0, 255), f"ssh poweroff: {result.returncode} {result.stderr}"
    return vm.wait_closed(timeout=timeout)


def generate_over_mqtt(vm, device: str, username: str, password: str, *, port: int = 1884,
                       request: dict | None = None, timeout: float = 120) -> dict:
    """One generate request (by default a 4-token "hello") from a sensor's account on the device's LAN broker port;
    the final reply."""
    client = MqttClient("127.0.0.1", vm.ports[port], username=username, password=password)
    try:
        return client.request(f"appliance/{device}/generate", request or {"prompt": "hello", "max_tokens": 4},
                              reply_topic=f"replies/{username}/{uuid.uuid4().hex}", timeout=timeout)[-1]
    finally:
        client.close()
