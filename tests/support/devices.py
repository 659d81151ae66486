"""Appliance images as devices for the system tests: cards written from an image, and SSH into a booted one."""

from __future__ import annotations

import json
import subprocess
import time
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


SYSTEM_PYTHON = "/usr/bin/python3"  # what a device has: Debian bookworm's python3, not this checkout's venv


def install(bundle: Path | None, device: Path, signing_key: Path, *args: str, command: str = "install",
            tool: Path | None = None):
    """The installer a bundle ships (its zipapp, run by Debian's python3 as on a device) on a scratch device:
    (the process, its JSON answer when it succeeded)."""
    from image import bundle as bundles
    signers = device / "bundle-signers"
    signers.parent.mkdir(parents=True, exist_ok=True)
    signers.write_text(bundles.allowed_signers(signing_key))
    tool = tool or bundle / "bin" / "appliance-install-bundle"
    result = subprocess.run([SYSTEM_PYTHON, str(tool), "--signers", str(signers), "--prefix",
                             str(device / "opt"), "--state-dir", str(device / "state"), "--units-dir",
                             str(device / "units"), "--tool", str(device / "sbin/appliance-install-bundle"), command,
                             *args, *([str(bundle)] if bundle else [])],
                            capture_output=True, text=True, timeout=600)
    body = json.loads(result.stdout) if result.returncode == 0 else None
    return result, body


def wait_status(vm, device: str, predicate, until: float, username: str, password: str,
                port: int = 1884) -> tuple[dict, float]:
    """The retained status of ``device`` once ``predicate`` holds, and when (seconds since power-on), read over the
    LAN listener with a sensor's account."""
    client = None
    while time.monotonic() < until:
        try:
            client = client or MqttClient("127.0.0.1", vm.ports[port], username=username, password=password)
            break
        except (ConnectionRefusedError, OSError):
            time.sleep(1)
    assert client is not None, "the broker never accepted the sensor's account:\n" + vm.console_text()[-3000:]
    found: list[dict] = []
    try:
        client.subscribe(f"appliance/{device}/status")
        while time.monotonic() < until:
            found = [json.loads(m.payload) for m in client.messages if m.topic.endswith("/status")]
            if found and predicate(found[-1]):
                return found[-1], time.monotonic() - vm.started_at
            time.sleep(0.5)
        raise AssertionError(f"status never matched; last: {found[-1] if found else None}\n"
                             + vm.console_text()[-3000:])
    finally:
        client.close()


def generate_over_mqtt(vm, device: str, username: str, password: str, *, port: int = 1884,
                       request: dict | None = None, timeout: float = 120) -> dict:
    """One generate request (by default a 4-token "hello") from a sensor's account on the device's LAN broker port,
    on the topic that ends in its account name (the shipped ACL's %u pattern); the final reply."""
    client = MqttClient("127.0.0.1", vm.ports[port], username=username, password=password)
    try:
        return client.request(f"appliance/{device}/generate/{username}",
                              request or {"prompt": "hello", "max_tokens": 4},
                              reply_topic=f"replies/{username}/{uuid.uuid4().hex}", timeout=timeout)[-1]
    finally:
        client.close()


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
