"""Boot an appliance image under QEMU with its services forwarded to loopback (the tests, `make image-boot*`).

Software emulation (TCG) always: on this kind of build machine ``/dev/kvm`` opens but a KVM guest hangs before
the kernel prints. The boot files come from the image's own FAT partition and are loaded directly, with the
image's cmdline.txt as it is (the firmware's job on real hardware). The amd64 twin boots as a q35 PC with virtio
devices; the Pi image boots as a Raspberry Pi 3B (``-M raspi3b``, image/raspi.py): its config.txt, device tree, SD
card, mini UART, USB network and GPIO. Guest ports are forwarded to 127.0.0.1.

    python -m image.qemu dist/appliance-0.1.0-amd64.img --forward 1884 --forward 8080 --forward 22
    python -m image.qemu dist/boot-arm64.img --ready      # a Pi 3B: how long until it serves, and its memory

An image serves HTTP to its own device only until an API key is set; ``--ready`` (and ``--api-key``) put one on
the card's boot partition, as an operator would, so that the forwarded port answers.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from appliance.transports.broker import die_with_parent, free_port
from image import disk, raspi
from image.steps import BuildError, say

TWIN = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-machine", "q35"]
HTTP_PORT = 8080


def arch_of(image: Path) -> str:
    return "amd64" if any(name == "vmlinuz" for name in disk.boot_files(image)) else "arm64"


class Monitor:
    """QEMU's machine protocol (QMP) on a unix socket: the emulated board seen from outside, as a probe would."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._lines = self.sock.makefile("r", encoding="utf-8")
        self._lines.readline()  # the greeting
        self._execute("qmp_capabilities")

    def _execute(self, command: str, **arguments):
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            line = self._lines.readline()
            if not line:
                raise BuildError("QEMU's monitor closed")
            answer = json.loads(line)
            if "error" in answer:
                raise BuildError(f"QEMU monitor: {command}: {answer['error']}")
            if "return" in answer:  # anything else is an event
                return answer["return"]

    def command(self, line: str) -> str:
        """A human monitor command (`info qtree`, `xp` ...) and what it prints."""
        return self._execute("human-monitor-command", **{"command-line": line})

    def read_word(self, address: int) -> int:
        """One 32-bit word of the guest's physical address space (a device register is read through its model)."""
        out = self.command(f"xp /1wx {address:#x}")
        found = re.search(rf"{address:016x}:\s+0x([0-9a-f]+)", out)
        if not found:
            raise BuildError(f"QEMU monitor: no word at {address:#x} in {out!r}")
        return int(found.group(1), 16)

    def close(self) -> None:
        self._lines.close()
        self.sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vm:
    """One booted image. ``ports`` maps guest ports to the loopback ports they are reachable on."""

    def __init__(self, image: Path, forwards: list[int], *, memory_mib: int = 2048, cpus: int = 2,
                 workdir: Path | None = None, offline: bool = False, drives: tuple[Path, ...] = ()) -> None:
        self.image = image
        self.arch = arch_of(image)
        self.ports = {guest: free_port() for guest in forwards}
        self.memory_mib, self.cpus = memory_mib, cpus
        self.offline = offline  # restrict=on: the guest reaches nothing but its forwarded ports
        self.drives = drives  # more disks, read-only: /dev/vdb, /dev/vdc ... in the guest
        self._tmp = None if workdir else tempfile.TemporaryDirectory()
        self.workdir = workdir or Path(self._tmp.name)
        self.console = self.workdir / "console.log"
        # QMP, one client at a time; a socket's path must fit sun_path (108 bytes), which a deep workdir may not
        self._sockets = tempfile.TemporaryDirectory(prefix="qmp-")
        self.monitor_socket = Path(self._sockets.name) / "monitor.sock"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> Vm:
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items())
        netdev = f"user,id=net0{',restrict=on' if self.offline else ''}{',' + forwards if forwards else ''}"
        command = self._pi_command(netdev) if self.arch == "arm64" else self._twin_command(netdev)
        if shutil.which(command[0]) is None:
            raise BuildError(f"{command[0]} not found (apt install qemu-system-x86 qemu-system-arm)")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent)  # a killed test leaves no VM behind
        return self

    def _twin_command(self, netdev: str) -> list[str]:
        disk.copy_from_boot(self.image, "vmlinuz", self.workdir / "kernel")
        disk.copy_from_boot(self.image, "initrd.img", self.workdir / "initrd")
        return [*TWIN, "-m", str(self.memory_mib), "-smp", str(self.cpus),
                "-kernel", str(self.workdir / "kernel"), "-initrd", str(self.workdir / "initrd"),
                "-append", disk.read_boot_file(self.image, "cmdline.txt").decode().strip(),
                "-drive", f"file={self.image},format=raw,if=virtio,cache=unsafe",
                *(arg for drive in self.drives for arg in ("-drive", f"file={drive},format=raw,if=virtio,readonly=on")),
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0", "-device", "virtio-rng-pci",
                "-display", "none", "-monitor", "none", "-qmp", f"unix:{self.monitor_socket},server=on,wait=off",
                "-serial", f"file:{self.console}", "-no-reboot"]

    def _pi_command(self, netdev: str) -> list[str]:
        raspi.check_card_size(self.image)
        boot = raspi.read_boot(self.image)
        kernel, initramfs, tree = raspi.load_boot_files(self.image, boot, self.workdir)
        return raspi.command(self, kernel, initramfs, tree, boot.cmdline, netdev, self.monitor_socket)

    def monitor(self) -> Monitor:
        """QEMU's monitor of this VM (a context manager; close it when done)."""
        return Monitor(self.monitor_socket)

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

    def power_cut(self) -> float:
        """Pull the plug now: QEMU killed (SIGKILL), the guest shut nothing down. Whatever the guest had handed to
        its disk is in the image file (the guest's own page cache is lost, as on a device); seconds since power-on.
        A virtual disk honours every write it completed, which a worn SD card's controller may not: this tests the
        software's ordering, not the card's firmware."""
        at = time.monotonic() - self.started_at
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return at

    def stop(self) -> None:
        """Pull the plug (what a power cut does); the image file keeps whatever the guest had written."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._sockets.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def report_serving(vm: Vm, api_key: str | None) -> None:
    """One chat completion (the default model is an instruct model), then what the board has left with the model
    loaded (the appliance's own readings)."""
    from appliance.cli.client import ask_http, get_status
    base = f"http://127.0.0.1:{vm.ports[HTTP_PORT]}"
    answer = ask_http(base, {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32,
                             "temperature": 0}, chat=True, api_key=api_key, timeout=1800)
    if answer.error:
        raise BuildError(f"completion refused: {answer.error}")
    say(f"completion: {answer.text!r} ({answer.usage['completion_tokens']} tokens, {answer.timings})")
    status = get_status(base, api_key=api_key, timeout=60)
    telemetry, memory = status["telemetry"], status["telemetry"]["memory"]
    say(f"memory with {status['model']} loaded: MemAvailable {memory['available_mib']:.0f} MiB of MemTotal "
        f"{memory['total_mib']:.0f} MiB; worker RSS {telemetry['worker_rss_mib']} MiB")


def with_api_key(settings: str, api_key: str) -> str:
    """The operator's appliance.toml with ``http.api_key`` set (in its ``[http]`` table when it has one)."""
    line = f'api_key = "{api_key}"\n'
    if re.search(r"^\[http\][ \t]*$", settings, flags=re.M):
        return re.sub(r"^\[http\][ \t]*\n?", lambda m: "[http]\n" + line, settings, count=1, flags=re.M)
    return f"{settings.rstrip()}\n\n[http]\n{line}".lstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.qemu", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="the image (a card: first boot writes to it)")
    parser.add_argument("--forward", type=int, action="append", default=[], help="a guest TCP port to forward")
    parser.add_argument("--memory", type=int, default=2048, help="MiB (the amd64 twin; a Pi 3B has 1 GiB)")
    parser.add_argument("--settings", type=Path, help="an appliance.toml to put on the card's FAT partition first, "
                        "as an operator does (docs/image.md)")
    parser.add_argument("--ready", action="store_true", help="print when the appliance's /readyz answers 200 "
                        "(forwards port 8080) and how long after power-on, ask for one completion, print the "
                        "memory left, then power off")
    parser.add_argument("--api-key", help="write this HTTP API key to the card's boot partition (appliance.toml), "
                        "which opens the API to the forwarded port; --ready makes one up when not given")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    size = args.image.stat().st_size
    if arch_of(args.image) == "arm64" and raspi.card_size(size) != size:
        say(f"growing {args.image} to {raspi.card_size(size) // 2**20} MiB: QEMU's SD card is a power of two")
        disk.grow(args.image, raspi.card_size(size) // 2**20)
    forwards = sorted({*args.forward, *([HTTP_PORT] if args.ready else [])})
    settings = args.settings.read_text() if args.settings else ""
    on_card = tomllib.loads(settings).get("http", {}).get("api_key")
    if args.api_key and on_card:
        parser.error("--settings already sets http.api_key: give the key in one place")
    api_key = args.api_key or on_card or (secrets.token_urlsafe(24) if args.ready else None)
    if api_key is not None and api_key != on_card:
        settings = with_api_key(settings, api_key)
        say(f"HTTP API key {api_key} written to the card's appliance.toml")
    if settings:
        disk.write_boot_file(args.image, "appliance.toml", settings.encode())
    vm = Vm(args.image, forwards, memory_mib=args.memory)
    vm.start()
    for guest, host in vm.ports.items():
        say(f"guest port {guest} -> 127.0.0.1:{host}")
    say(f"{vm.arch} guest booting; console: {vm.console}")
    try:
        if args.ready:
            say(f"appliance ready {vm.wait_ready(args.timeout, api_key):.0f} s after power-on")
            report_serving(vm, api_key)
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
