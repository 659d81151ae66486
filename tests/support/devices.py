"""Appliance images as devices for the system tests: cards written from an image, and SSH into a booted one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


def new_card(image: Path, path: Path, spare_mib: int = 768) -> Path:
    """A fresh 'SD card' with the image written to it, bigger than the image (root grows into the rest)."""
    from image import disk
    subprocess.run(["cp", "--sparse=always", str(image), str(path)], check=True)
    disk.grow(path, image.stat().st_size // 2**20 + spare_mib)
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


def wait_serving(vm, key: Path, timeout: float) -> float:
    """Seconds since power-on when the appliance said it is ready, asked on the device itself over SSH (`appliance
    status` with the device's own config): a device without an API key serves HTTP to itself only."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            result = _ssh(vm, key, "sudo /opt/appliance/current/venv/bin/appliance status --config "
                                   "/etc/appliance/appliance.toml", timeout=60)
            if result.returncode == 0:
                return time.monotonic() - vm.started_at
            last = result.stdout + result.stderr
        except subprocess.TimeoutExpired:
            pass
        time.sleep(3)
    raise TimeoutError(f"not serving after {timeout:.0f} s ({last.strip()}); console:\n" + vm.console_text()[-3000:])
