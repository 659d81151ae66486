"""Appliance images as devices for the system tests: cards written from an image, and SSH into a booted one."""

from __future__ import annotations

import subprocess
from pathlib import Path

SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


def new_card(image: Path, path: Path, spare_mib: int = 768) -> Path:
    """A fresh 'SD card' with the image written to it, bigger than the image (root grows into the rest)."""
    from image import disk
    subprocess.run(["cp", "--sparse=always", str(image), str(path)], check=True)
    disk.grow(path, image.stat().st_size // 2**20 + spare_mib)
    return path


def ssh(vm, key: Path, command: str, timeout: float = 60) -> str:
    """Run a command on a booted image as `admin` (keys only, as on a real device); its output."""
    result = subprocess.run(["ssh", "-i", str(key), "-p", str(vm.ports[22]), *SSH_OPTIONS, "admin@127.0.0.1",
                             command], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"ssh {command!r}: {result.stderr}"
    return result.stdout
