"""Boot an appliance image under QEMU with its services forwarded to loopback (the tests, `make image-boot*`).

Software emulation (TCG) always: on this kind of build machine ``/dev/kvm`` opens but a KVM guest hangs before
the kernel prints. The kernel and initramfs are taken from the image's own FAT partition and booted directly, with
the image's cmdline.txt (the Pi firmware's job on real hardware). Guest ports are forwarded to 127.0.0.1.

    python -m image.qemu dist/appliance-0.1.0-amd64.img --forward 1884 --forward 8080 --forward 22
    python -m image.qemu dist/appliance-0.1.0-rpi-arm64.img --ready      # how long until it serves

An image serves HTTP to its own device only until an API key is set; ``--ready`` (and ``--api-key``) put one on
the card's boot partition, as an operator would, so that the forwarded port answers.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from appliance.transports.broker import die_with_parent, free_port
from image import disk
from image.steps import BuildError, say

QEMU = {"amd64": ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-machine", "q35"],
        "arm64": ["qemu-system-aarch64", "-accel", "tcg", "-machine", "virt", "-cpu", "cortex-a72"]}
CONSOLE = {"amd64": "ttyS0", "arm64": "ttyAMA0"}
HTTP_PORT = 8080


def arch_of(image: Path) -> str:
    return "amd64" if any(name == "vmlinuz" for name in disk.boot_files(image)) else "arm64"


def kernel_args(image: Path, arch: str) -> str:
    """The image's cmdline.txt with the console QEMU's serial port is (a Pi's is another UART)."""
    args = [a for a in disk.read_boot_file(image, "cmdline.txt").decode().split() if not a.startswith("console=")]
    return " ".join([*args, f"console={CONSOLE[arch]}"])


class Vm:
    """One booted image. ``ports`` maps guest ports to the loopback ports they are reachable on."""

    def __init__(self, image: Path, forwards: list[int], *, memory_mib: int = 2048, cpus: int = 2,
                 workdir: Path | None = None, offline: bool = False) -> None:
        self.image = image
        self.arch = arch_of(image)
        self.ports = {guest: free_port() for guest in forwards}
        self.memory_mib, self.cpus = memory_mib, cpus
        self.offline = offline  # restrict=on: the guest reaches nothing but its forwarded ports
        self._tmp = None if workdir else tempfile.TemporaryDirectory()
        self.workdir = workdir or Path(self._tmp.name)
        self.console = self.workdir / "console.log"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> Vm:
        names = disk.boot_files(self.image)
        if self.arch == "amd64":
            kernel, initrd = "vmlinuz", "initrd.img"
        else:
            kernel = sorted(n for n in names if n.startswith("vmlinuz-"))[-1]
            initrd = sorted(n for n in names if n.startswith("initrd.img-"))[-1]
        disk.copy_from_boot(self.image, kernel, self.workdir / "kernel")
        disk.copy_from_boot(self.image, initrd, self.workdir / "initrd")
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items())
        command = [*QEMU[self.arch], "-m", str(self.memory_mib), "-smp", str(self.cpus),
                   "-kernel", str(self.workdir / "kernel"), "-initrd", str(self.workdir / "initrd"),
                   "-append", kernel_args(self.image, self.arch),
                   "-drive", f"file={self.image},format=raw,if=virtio,cache=unsafe",
                   "-netdev", f"user,id=net0{',restrict=on' if self.offline else ''}"
                              f"{',' + forwards if forwards else ''}",
                   "-device", "virtio-net-pci,netdev=net0", "-device", "virtio-rng-pci",
                   "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}", "-no-reboot"]
        if shutil.which(command[0]) is None:
            raise BuildError(f"{command[0]} not found (apt install qemu-system-x86 qemu-system-arm)")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent)  # a killed test leaves no VM behind
        return self

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, text: str, timeout: float) -> float:
        """Seconds since power-on when ``text`` appeared on the serial console."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console_text():
                return time.monotonic() - self.started_at
            if self.process.poll() is not None:
                raise BuildError(f"QEMU exited ({self.process.returncode}): {self.process.stdout.read()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} not on the console after {timeout:.0f} s; last lines:\n"
                           + "\n".join(self.console_text().splitlines()[-30:]))

    def wait_ready(self, timeout: float, api_key: str) -> float:
        """Seconds since power-on when the appliance's /readyz first answered 200 (needs port 8080 forwarded and
        the API key the card was given)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[HTTP_PORT]}/readyz",
                                         headers={"Authorization": f"Bearer {api_key}"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 (http to the guest)
                    if reply.status == 200:
                        return time.monotonic() - self.started_at
            except (OSError, urllib.error.URLError):
                pass
            if self.process.poll() is not None:
                raise BuildError(f"QEMU exited ({self.process.returncode})")
            time.sleep(1)
        raise TimeoutError(f"/readyz not 200 after {timeout:.0f} s; console:\n" + self.console_text()[-3000:])

    def wait_closed(self, timeout: float) -> int:
        """Wait for the guest to power off by itself (after ``poweroff``)."""
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Pull the plug (what a power cut does); the image file keeps whatever the guest had written."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.qemu", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--forward", type=int, action="append", default=[], help="a guest TCP port to forward")
    parser.add_argument("--memory", type=int, default=2048, help="MiB")
    parser.add_argument("--ready", action="store_true", help="print when the appliance's /readyz answers 200 "
                        "(forwards port 8080) and how long after power-on, then power off")
    parser.add_argument("--api-key", help="write this HTTP API key to the card's boot partition (appliance.toml), "
                        "which opens the API to the forwarded port; --ready makes one up when not given")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    forwards = sorted({*args.forward, *([HTTP_PORT] if args.ready else [])})
    api_key = args.api_key or (secrets.token_urlsafe(24) if args.ready else None)
    if api_key is not None:
        disk.write_boot_file(args.image, "appliance.toml", f'[http]\napi_key = "{api_key}"\n'.encode())
        say(f"HTTP API key {api_key} written to the card's appliance.toml")
    vm = Vm(args.image, forwards, memory_mib=args.memory)
    vm.start()
    for guest, host in vm.ports.items():
        say(f"guest port {guest} -> 127.0.0.1:{host}")
    say(f"{vm.arch} guest booting; console: {vm.console}")
    try:
        if args.ready:
            say(f"appliance ready {vm.wait_ready(args.timeout, api_key):.0f} s after power-on")
        else:
            vm.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print(vm.console_text()[-3000:], file=sys.stderr)
        vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
