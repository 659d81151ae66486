"""The partitioned image, made by genimage from the finished root tree: no loop devices, no mounts.

    partition 1  FAT32 "APPBOOT"  /boot/firmware: Pi firmware, kernel, initramfs, DTBs, config.txt, cmdline.txt,
                                  and the operator's first-boot files (README.txt, appliance.toml.example)
    partition 2  ext4 "approot"   everything else, models and state under /var/lib/appliance; grown at first boot

The amd64 twin has the same layout; QEMU boots its kernel directly (``-kernel``/``-initrd``), so the FAT
partition carries the kernel and a cmdline.txt like the Pi's but no firmware.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from image.rootfs import tree_size
from image.steps import BuildError, run, step

BOOT_LABEL = "APPBOOT"
ROOT_LABEL = "approot"
BOOT_MIB = 256
ROOT_HEADROOM = 1.15  # ext4 metadata and reserved blocks; first boot grows it to the card anyway
ROOT_SPARE_MIB = 384  # free room on a card no bigger than the image (logs, a second release during an update)
TWIN_CMDLINE = f"root=LABEL={ROOT_LABEL} rw rootwait console=ttyS0 psi=1 cgroup_enable=memory"


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int
    type: str


def prepare_boot(rootfs: Path, arch: str) -> None:
    """The twin's boot partition: the kernel and initramfs under stable names, and a cmdline.txt."""
    firmware = rootfs / "boot" / "firmware"
    firmware.mkdir(parents=True, exist_ok=True)
    if arch == "amd64":
        kernel = sorted((rootfs / "boot").glob("vmlinuz-*"))[-1]
        initrd = sorted((rootfs / "boot").glob("initrd.img-*"))[-1]
        shutil.copyfile(kernel, firmware / "vmlinuz")
        shutil.copyfile(initrd, firmware / "initrd.img")
        (firmware / "cmdline.txt").write_text(TWIN_CMDLINE + "\n")
    elif not (firmware / "config.txt").is_file():
        raise BuildError(f"{firmware}: no config.txt; raspi-firmware's hook did not run in the base stage")


def genimage_config(root_mib: int) -> str:
    return f"""\
image boot.vfat {{
    vfat {{ label = "{BOOT_LABEL}" extraargs = "-F 32" }}
    size = {BOOT_MIB}M
    mountpoint = "/boot/firmware"
}}
image root.ext4 {{
    ext4 {{ label = "{ROOT_LABEL}" use-mke2fs = true features = "^metadata_csum_seed" }}
    size = {root_mib}M
    mountpoint = "/"
}}
image appliance.img {{
    hdimage {{ partition-table-type = "mbr" align = 4M }}
    partition boot {{ partition-type = 0xC bootable = true image = "boot.vfat" }}
    partition root {{ partition-type = 0x83 image = "root.ext4" }}
}}
"""


def build(rootfs: Path, arch: str, image: Path) -> Path:
    """genimage the tree into ``image`` (raw)."""
    prepare_boot(rootfs, arch)
    root_mib = int(math.ceil(tree_size(rootfs) * ROOT_HEADROOM / 2**20 / 4) * 4) + ROOT_SPARE_MIB
    with step(f"disk image ({BOOT_MIB} MiB boot + {root_mib} MiB root)"), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "genimage.cfg").write_text(genimage_config(root_mib))
        for name in ("in", "out", "work"):
            (tmp / name).mkdir()
        # As root, genimage runs as it is: under fakeroot its `cp -a` of the tree would see every file as root's
        # (fakeroot's stat) and the image would lose the tree's real owners (seen: /home/admin, /var/lib/mosquitto
        # became root's). fakeroot is for building from a tree that was itself made under fakeroot.
        wrapper = [] if os.geteuid() == 0 else ["fakeroot"]
        run([*wrapper, "genimage", "--rootpath", str(rootfs), "--config", str(tmp / "genimage.cfg"),
             "--inputpath", str(tmp / "in"), "--outputpath", str(tmp / "out"), "--tmppath", str(tmp / "work")])
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp / "out" / "appliance.img", image)
    return image


def compress(image: Path) -> Path:
    with step(f"compressing {image.name} (xz)"):
        run(["xz", "-T0", "-3", "-f", "-k", str(image)])
    return image.with_name(image.name + ".xz")


def partitions(image: Path) -> list[Partition]:
    table = json.loads(run(["sfdisk", "--json", str(image)]))["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [Partition(number=i + 1, start=p["start"] * sector, size=p["size"] * sector, type=p["type"])
            for i, p in enumerate(table["partitions"])]


def boot_files(image: Path) -> list[str]:
    """The names at the top of the FAT partition (mtools reads it inside the image file)."""
    offset = partitions(image)[0].start
    listing = run(["mdir", "-b", "-i", f"{image}@@{offset}", "::/"])
    return sorted(line.strip().removeprefix("::/") for line in listing.splitlines() if line.strip())


def read_boot_file(image: Path, name: str) -> bytes:
    offset = partitions(image)[0].start
    return subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::/{name}"], capture_output=True,
                          check=True).stdout


def copy_from_boot(image: Path, name: str, dest: Path) -> Path:
    offset = partitions(image)[0].start
    run(["mcopy", "-o", "-n", "-i", f"{image}@@{offset}", f"::/{name}", str(dest)])
    return dest


def write_boot_file(image: Path, name: str, data: bytes) -> None:
    """Put a file on the FAT partition, as an operator does from a laptop."""
    offset = partitions(image)[0].start
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        run(["mcopy", "-o", "-i", f"{image}@@{offset}", f.name, f"::/{name}"])


def grow(image: Path, size_mib: int) -> None:
    """Make the image file a bigger 'card' (the partitions stay; first boot grows the root into the space)."""
    with image.open("r+b") as f:
        f.truncate(size_mib * 2**20)


def label_of(image: Path, number: int) -> str:
    """The file system label of a partition, probed inside the image file."""
    part = partitions(image)[number - 1]
    return run(["blkid", "--probe", "--offset", str(part.start), "--size", str(part.size), "-s", "LABEL", "-o",
                "value", str(image)]).strip()
