"""The Raspberry Pi image (arm64), built as `make image` builds it: its partition table, boot files, config.txt and
cmdline.txt, file ownership inside the ext4, and the installed appliance importing llama.cpp and generating with a
tiny model inside its root file system under qemu-user; then the image booted under qemu-system-aarch64 -M virt
(its own arm64 kernel and initramfs; QEMU's device tree, not a Pi's) serving with the boot partition's settings.
`make image-boot-arm64` is the same boot of the image with the embedded default model."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from image import disk, rootfs
from image.qemu import HTTP_PORT, Vm
from image.steps import cache_dir
from tests.support import tiny_onnx
from tests.support.devices import new_card
from tests.support.harness import http_get, http_post

pytestmark = pytest.mark.image

PI_BOOT_FILES = {"bootcode.bin", "start4.elf", "fixup4.dat", "start.elf", "fixup.dat", "config.txt", "cmdline.txt",
                 "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb", "bcm2837-rpi-3-b-plus.dtb",
                 "README.txt", "appliance.toml.example"}


@pytest.fixture(scope="session")
def bundle_arm64(as_root, tmp_path_factory, tiny_catalog, signing_key):
    from image import bundle
    return bundle.build("arm64", tmp_path_factory.mktemp("dist-arm64"), catalog=tiny_catalog, key=signing_key,
                        tarball=False)


@pytest.fixture(scope="session")
def arm64_image(bundle_arm64, signing_key, tmp_path_factory):
    """The compressed image, and the raw one it expands to."""
    from image import build
    out = tmp_path_factory.mktemp("image-arm64")
    packed = build.build("arm64", out, bundle=bundle_arm64, key=signing_key, compress=True, keep_tree=True)
    raw = out / "raw.img"
    with raw.open("wb") as f:
        subprocess.run(["xz", "-dc", str(packed)], stdout=f, check=True)
    return packed, raw


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
    tree = cache_dir() / "work" / "rootfs-arm64"
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


def test_the_image_boots_under_qemu_system_aarch64(arm64_image, tmp_path):
    """Power-on to serving on an emulated arm64 board, first boot included (about a minute under TCG here)."""
    _, raw = arm64_image
    card = new_card(raw, tmp_path / "card.img", spare_mib=512)
    key = "the-api-key-of-pi-twin-07"
    disk.write_boot_file(card, "appliance.toml", f'[device]\nid = "pi-twin-07"\n[http]\napi_key = "{key}"\n'.encode())
    with Vm(card, [HTTP_PORT], workdir=tmp_path) as vm:
        ready_after = vm.wait_ready(timeout=900, api_key=key)
        print(f"arm64: /readyz 200 {ready_after:.0f} s after power-on")
        base, auth = f"http://127.0.0.1:{vm.ports[HTTP_PORT]}", {"Authorization": f"Bearer {key}"}
        status = json.loads(http_get(f"{base}/status", headers=auth, timeout=30)[1])
        assert status["device"] == "pi-twin-07" and status["model"] == "tiny", status
        code, reply = http_post(f"{base}/v1/completions", {"prompt": "hello", "max_tokens": 4}, headers=auth,
                                timeout=120)
        assert code == 200 and reply["usage"]["completion_tokens"] >= 1, reply
    assert "appliance.toml" not in disk.boot_files(card), "first boot moved the settings off the FAT partition"
