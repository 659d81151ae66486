"""The Raspberry Pi image (arm64), built as `make image` builds it: its partition table, boot files, config.txt and
cmdline.txt, file ownership inside the ext4, and the installed appliance importing llama.cpp and generating with a
tiny model inside its root file system under qemu-user; then the image booted as a Raspberry Pi 3B under QEMU
(`-M raspi3b`) from its own config.txt, kernel, initramfs, device tree and cmdline.txt, serving over the emulated
USB network with the boot partition's settings, its status LED and button on the BCM2835 GPIO chip.
`make image-boot-arm64` is the same boot of the image with the default model."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from image import disk, raspi, rootfs
from image.qemu import HTTP_PORT, Vm
from tests.support import tiny_onnx
from tests.support.devices import generate_over_mqtt, new_card, power_off, ssh
from tests.support.harness import http_get, http_post

pytestmark = [pytest.mark.image, pytest.mark.quiet]

PI_BOOT_FILES = {"bootcode.bin", "start4.elf", "fixup4.dat", "start.elf", "fixup.dat", "config.txt", "cmdline.txt",
                 "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb", "bcm2837-rpi-3-b-plus.dtb",
                 "README.txt", "appliance.toml.example"}


@pytest.fixture(scope="session")
def arm64_image(as_root, image_builds):
    """The compressed image, and the raw one it expands to (built beside other tests: tests/support/image_builds.py)."""
    built = image_builds.result("arm64")
    return built["packed"], built["raw"]


def test_the_image_is_named_and_summarised(arm64_image):
    packed, _ = arm64_image
    assert packed.name == "appliance-0.1.0-rpi-arm64.img.xz"
    summary = json.loads(packed.with_name(packed.name + ".json").read_text())
    assert summary["arch"] == "arm64" and summary["bytes"] == packed.stat().st_size
    assert set(summary["steps"]) >= {"base", "layer", "disk", "compress"}


def test_partitions_and_boot_files(arm64_image):
    _, raw = arm64_image
    boot, root = disk.partitions(raw)
    assert (boot.type, root.type) == ("c", "83")
    assert boot.start % (4 * 2**20) == 0 and root.start % (4 * 2**20) == 0, "aligned for SD cards"
    assert (disk.label_of(raw, 1), disk.label_of(raw, 2)) == ("APPBOOT", "approot")
    files = set(disk.boot_files(raw))
    assert files >= PI_BOOT_FILES, PI_BOOT_FILES - files
    assert any(f.startswith("vmlinuz-") for f in files) and any(f.startswith("initrd.img-") for f in files)
    config = disk.read_boot_file(raw, "config.txt").decode()
    assert "arm_64bit=1" in config and "initramfs initrd.img-" in config
    assert "[cm4]\ndevice_tree=bcm2711-rpi-cm4-io.dtb\n[all]" in config, "a CM4 gets its own device tree"
    cmdline = disk.read_boot_file(raw, "cmdline.txt").decode().split()
    assert {"root=LABEL=approot", "psi=1", "cgroup_enable=memory"} <= set(cmdline), cmdline


def _debugfs(partition, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(partition)], capture_output=True, text=True).stdout


def test_the_root_file_system_inside_the_image(arm64_image, tmp_path):
    _, raw = arm64_image
    root = disk.partitions(raw)[1]
    part = tmp_path / "root.ext4"
    subprocess.run(["dd", f"if={raw}", f"of={part}", "bs=4M", f"skip={root.start // (4 * 2**20)}",
                    f"count={root.size // (4 * 2**20)}", "conv=sparse", "status=none"], check=True)
    assert "LABEL=approot" in _debugfs(part, "cat /etc/fstab")
    assert _debugfs(part, "cat /etc/machine-id").strip() == "", "each device makes its own machine id"
    assert "ssh_host_" not in _debugfs(part, "ls /etc/ssh"), "no SSH host key is shared by every device"
    passwd = _debugfs(part, "cat /etc/passwd")
    uid = next(line.split(":")[2] for line in passwd.splitlines() if line.startswith("admin:"))
    assert f"User: {uid:>5}" in _debugfs(part, "stat /home/admin"), "the tree's owners are the image's"
    mosquitto = next(line.split(":")[2] for line in passwd.splitlines() if line.startswith("mosquitto:"))
    assert f"User: {mosquitto:>5}" in _debugfs(part, "stat /var/lib/mosquitto"), "the broker can save its state"
    assert "appliance-bundle" in _debugfs(part, "cat /etc/appliance/bundle-signers")
    assert "-> releases/0.1.0" in _debugfs(part, "stat /opt/appliance/current") or \
        "releases/0.1.0" in _debugfs(part, "stat /opt/appliance/current")
    wants = _debugfs(part, "ls /etc/systemd/system/multi-user.target.wants")
    assert "appliance.service" in wants and "appliance-firstboot.service" in wants


def test_the_appliance_runs_inside_the_root_under_qemu_user(arm64_image):
    """llama.cpp generates and onnxruntime classifies inside the image's own root, as aarch64 code."""
    packed, _ = arm64_image
    tree = Path(json.loads(packed.with_name(packed.name + ".json").read_text())["tree"])
    assert tree.is_dir(), "the build keeps its tree for this test (keep_tree=True)"
    tiny_onnx.write_classifier(tree / "var/tmp/classifier.onnx")
    features = [[0.3, -1.2, 2.0, 0.5]]
    script = ("import json, appliance, llama_cpp, onnxruntime, lgpio, platform, numpy\n"
              "llm = llama_cpp.Llama('/opt/appliance/current/models/tiny-q4_0.gguf', n_ctx=128, verbose=False)\n"
              "out = llm.create_completion('hello', max_tokens=4, temperature=0)\n"
              "session = onnxruntime.InferenceSession('/var/tmp/classifier.onnx')\n"
              f"probabilities = session.run(None, {{'features': numpy.array({features}, numpy.float32)}})[0]\n"
              "print(json.dumps([platform.machine(), appliance.__version__, out['usage']['completion_tokens'],\n"
              "                  probabilities.tolist()]))\n")
    try:
        out = rootfs.chroot_run(tree, ["/opt/appliance/current/venv/bin/python", "-c", script])
    finally:
        (tree / "var/tmp/classifier.onnx").unlink()
    machine, version, tokens, probabilities = json.loads(out.strip().splitlines()[-1])
    assert (machine, version) == ("aarch64", "0.1.0") and tokens >= 1
    expected = tiny_onnx.classify(np.array(features, np.float32))
    assert np.allclose(probabilities, expected, atol=1e-5), "the same answer as onnxruntime on x86"


SENSOR, SECRET = "weather-station", "a long sensor password"
API_KEY = "the-api-key-of-pi3-07-0123"  # what opens the HTTP API to the network (the forwarded port)
LAN_MQTT, SSH = 1884, 22
LED_PIN, BUTTON_PIN = 17, 27
PI_SETTINGS = f"""[device]
id = "pi3-07"

[http]
api_key = "{API_KEY}"

[mqtt_users]
{SENSOR} = "{SECRET}"

[gpio]
pin_factory = "lgpio"
status_led = "GPIO{LED_PIN}"
shutdown_button = "GPIO{BUTTON_PIN}"

[worker]
# The emulated board's four cores share the build machine's two: llama.cpp's threads wait for each other by
# spinning, and four of them generate 60 times slower than one here (measured: 40 tokens in 19.8 s against 0.3 s).
threads = 1
"""


class PinRecorder(threading.Thread):
    """Samples a pin of the emulated GPIO chip through QEMU's monitor and keeps every change: a logic analyser on
    the board's header, outside the guest."""

    def __init__(self, vm: Vm, pin: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.vm, self.pin, self.every = vm, pin, every
        self.changes: list[tuple[float, raspi.PinState]] = []  # (seconds since power-on, state)
        self._done = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with self.vm.monitor() as monitor:
                while not self._done.is_set() and self.vm.process.poll() is None:
                    state = raspi.gpio_pin(monitor, self.pin)
                    if not self.changes or self.changes[-1][1] != state:
                        self.changes.append((time.monotonic() - self.vm.started_at, state))
                    time.sleep(self.every)
        except BaseException as exc:  # noqa: BLE001 - handed to the test by stop()
            self.failure = exc

    def toggles(self, since: float, until: float) -> int:
        """Level changes while the pin was an output, between two times since power-on."""
        levels = [state.level for t, state in self.changes if since <= t <= until and state.output]
        return sum(a != b for a, b in zip(levels, levels[1:], strict=False))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=30)
        if self.failure is not None:
            raise AssertionError(f"reading GPIO{self.pin} through QEMU's monitor failed") from self.failure


# What the device says about itself, in one SSH round trip (each one is seconds under emulation)
DEVICE_FACTS = r"""
import json, os, subprocess
def run(*a): return subprocess.run(a, capture_output=True, text=True).stdout.strip()
root = run("findmnt", "-no", "SOURCE", "/")
host = next(p for p in os.path.realpath("/sys/class/block/" + os.path.basename(root)).split("/") if p.endswith(".mmc"))
fs = os.statvfs("/")
print(json.dumps({
    "cmdline": open("/proc/cmdline").read().split(), "model": open("/proc/device-tree/model").read().strip("\0"),
    "root": root, "sd_host": os.path.basename(os.path.realpath("/sys/bus/platform/devices/" + host + "/driver")),
    "root_bytes": int(run("blockdev", "--getsize64", root)), "fs_bytes": fs.f_blocks * fs.f_frsize,
    "firstboot": json.load(open("/var/lib/appliance/firstboot.json")), "gpio": open("/sys/kernel/debug/gpio").read(),
    "gpio_log": run("journalctl", "-b", "-u", "appliance", "-g", "GPIO|lgd-nfy"),
}))
"""


def test_the_image_boots_as_a_raspberry_pi_3b(arm64_image, operator_key, tmp_path):
    """Power-on to serving on QEMU's Pi 3B from the card's own boot files; first boot grows the root on the SD
    card and applies the settings file; the status LED and the shutdown button go through gpiozero and lgpio to
    the BCM2835 GPIO chip, read back through the chip inside and through the emulated registers outside."""
    _, raw = arm64_image
    card = new_card(raw, tmp_path / "card.img", spare_mib=256, power_of_two=True)
    disk.write_boot_file(card, "appliance.toml", PI_SETTINGS.encode())
    disk.write_boot_file(card, "authorized_keys", operator_key.with_suffix(".pub").read_bytes())
    root_before = disk.partitions(card)[1].size

    with Vm(card, [HTTP_PORT, LAN_MQTT, SSH], workdir=tmp_path) as vm:
        led = PinRecorder(vm, LED_PIN)
        led.start()
        try:
            ready_after = vm.wait_ready(timeout=900, api_key=API_KEY)
            print(f"raspi3b: /readyz 200 {ready_after:.0f} s after power-on")
            base, auth = f"http://127.0.0.1:{vm.ports[HTTP_PORT]}", {"Authorization": f"Bearer {API_KEY}"}
            status = json.loads(http_get(f"{base}/status", headers=auth, timeout=30)[1])
            assert status["device"] == "pi3-07" and status["model"] == "tiny", status
            memory = status["telemetry"]["memory"]
            print(f"raspi3b: MemTotal {memory['total_mib']} MiB, MemAvailable {memory['available_mib']} MiB, worker "
                  f"RSS {status['telemetry']['worker_rss_mib']} MiB with the tiny model loaded")

            reply = generate_over_mqtt(vm, "pi3-07", SENSOR, SECRET, port=LAN_MQTT)
            assert reply["type"] == "result" and reply["usage"]["completion_tokens"] >= 1, reply
            code, completion = http_post(f"{base}/v1/completions", {"prompt": "hello", "max_tokens": 4},
                                         headers=auth, timeout=120)
            assert code == 200 and completion["usage"]["completion_tokens"] >= 1, completion

            facts = json.loads(ssh(vm, operator_key, f"sudo python3 -c '{DEVICE_FACTS}'", timeout=120))
            checked_at = time.monotonic() - vm.started_at
        finally:
            led.stop()
        _the_pi_boot_path(facts, card, root_before)
        _the_gpio_path(facts, led, ready_after, checked_at)
        assert power_off(vm, operator_key, timeout=300) == 0, "the guest switched itself off"
    files = disk.boot_files(card)
    assert "appliance.toml" not in files and "appliance.toml.applied" in files, files


def _the_pi_boot_path(facts: dict, card, root_before: int) -> None:
    """What ran is what the card says: its kernel command line, the Pi's device tree, the root on the SD card."""
    assert facts["cmdline"] == disk.read_boot_file(card, "cmdline.txt").decode().split(), facts["cmdline"]
    assert facts["model"] == "Raspberry Pi 3 Model B", facts["model"]
    assert (facts["root"], facts["sd_host"]) == ("/dev/mmcblk0p2", "sdhost-bcm2835"), facts
    report = facts["firstboot"]
    assert report["problems"] == [] and "config: device, gpio, http, worker (API key set)" in report["applied"], report
    assert facts["root_bytes"] > root_before + 128 * 2**20, "the root partition grew into the card"
    assert facts["fs_bytes"] > root_before, "and the ext4 on it"


def _the_gpio_path(facts: dict, led: PinRecorder, ready_after: float, checked_at: float) -> None:
    """The service's pins are claimed on the BCM2835 chip; the LED blinked while loading and is lit when ready."""
    lines = {m.group(1): m.groups()[1:] for m in
             re.finditer(r"\((GPIO\d+)\s*\|(\S+)\s*\)\s+(in|out)\s+(hi|lo)", facts["gpio"])}
    print(f"raspi3b: claimed on the BCM2835 chip: {lines}")
    assert lines.get(f"GPIO{LED_PIN}") == ("lg", "out", "hi"), (lines, facts["gpio_log"])
    assert lines.get(f"GPIO{BUTTON_PIN}", ())[:2] == ("lg", "in"), lines
    assert led.changes and led.changes[-1][1] == raspi.PinState(output=True, level=True), led.changes
    blinks = led.toggles(0, ready_after)
    print(f"raspi3b: status LED: {blinks} level changes before ready, lit from {led.changes[-1][0]:.0f} s on")
    assert blinks >= 4, f"the LED blinked while the service started and loaded: {led.changes}"
    assert led.toggles(ready_after + 1, checked_at) == 0, f"and is steady once ready: {led.changes}"
