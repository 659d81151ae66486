"""The image booted as a Raspberry Pi 3B under QEMU (`-M raspi3b`: BCM2837, 1 GiB, SD host, mini UART, USB, GPIO).

QEMU cannot run the Pi's GPU firmware, so this module does the firmware's part of a boot from the image's own FAT
partition, as the firmware would: ``config.txt`` says which kernel, initramfs and device tree to load (its ``[pi3]``
and ``[all]`` sections), ``cmdline.txt`` is the kernel command line as it is on the card, and the device tree gets
the one property the firmware adds that the appliance reads (the board revision, which gpiozero needs). What QEMU
itself does not model (found by booting Debian's kernel here) is in docs/image.md.

It also reads the BCM2835 GPIO registers from outside the guest (QEMU's monitor), to see what the service set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from image import disk
from image.steps import BuildError, run

if TYPE_CHECKING:
    from image.qemu import Monitor

MACHINE = "raspi3b"
#: what QEMU's raspi3b answers to the firmware's "board revision" query: a Pi 3 Model B rev 1.2, 1 GiB, Sony UK
BOARD_REVISION = 0xA02082
CONFIG_FILTERS = ("all", "pi3")  # the config.txt sections a Pi 3 Model B applies
GPIO_BASE = 0x3F200000  # the BCM2835 GPIO block in the BCM2837's ARM physical address space
GPFSEL, GPLEV = 0x00, 0x34  # function select (3 bits per pin, 10 pins per word), pin level (1 bit per pin)
OUTPUT_FUNCTION = 1


@dataclass(frozen=True)
class PiBoot:
    """What the firmware loads for a Pi 3B from this card (names on the FAT partition) and the kernel's command line."""

    kernel: str
    initramfs: str
    device_tree: str
    cmdline: str


def config_settings(text: str) -> dict[str, str]:
    """The settings of a config.txt that a Pi 3B applies: lines outside a section or in ``[all]`` or ``[pi3]``
    (each section header replaces the filter before it); ``initramfs FILE`` is stored as ``initramfs``."""
    settings: dict[str, str] = {}
    applies = True
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            applies = line[1:-1].strip().lower() in CONFIG_FILTERS
        elif applies and line.startswith("initramfs "):
            settings["initramfs"] = line.split()[1]
        elif applies and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            settings[key] = value
    return settings


def read_boot(image: Path) -> PiBoot:
    """Follow config.txt as the firmware does for a Pi 3B; every file it names must be on the FAT partition."""
    settings = config_settings(disk.read_boot_file(image, "config.txt").decode())
    if settings.get("arm_64bit") != "1":
        raise BuildError(f"{image}: config.txt does not set arm_64bit=1 for a Pi 3; this image's kernel is arm64")
    upstream = settings.get("upstream_kernel") == "1"
    boot = PiBoot(kernel=settings.get("kernel", "kernel8.img"), initramfs=settings.get("initramfs", ""),
                  device_tree=settings.get("device_tree") or ("bcm2837-rpi-3-b.dtb" if upstream
                                                              else "bcm2710-rpi-3-b.dtb"),
                  cmdline=disk.read_boot_file(image, settings.get("cmdline", "cmdline.txt")).decode().strip())
    on_card = set(disk.boot_files(image))
    missing = [name for name in (boot.kernel, boot.initramfs, boot.device_tree) if name not in on_card]
    if not boot.initramfs or missing:
        raise BuildError(f"{image}: config.txt names {missing or 'no initramfs'}, which the FAT partition lacks")
    return boot


def load_boot_files(image: Path, boot: PiBoot, into: Path) -> tuple[Path, Path, Path]:
    """The kernel, initramfs and device tree copied off the card; the tree with what the firmware would add."""
    kernel = disk.copy_from_boot(image, boot.kernel, into / "kernel")
    initramfs = disk.copy_from_boot(image, boot.initramfs, into / "initramfs")
    tree = disk.copy_from_boot(image, boot.device_tree, into / boot.device_tree)
    # The firmware puts the board revision into /system (Debian's upstream trees have no such node); gpiozero reads
    # it there on arm64, where /proc/cpuinfo has no Revision line, and refuses to drive a pin without it.
    run(["fdtput", "--auto-path", "-t", "x", str(tree), "/system", "linux,revision", f"{BOARD_REVISION:x}"])
    return kernel, initramfs, tree


def check_card_size(image: Path) -> None:
    """QEMU's SD card model takes only power-of-two sizes (a real card's size is whatever it is)."""
    size = image.stat().st_size
    if size & (size - 1):
        raise BuildError(f"{image}: {size} bytes; QEMU's SD card must be a power of two in size "
                         f"(grow it: truncate -s {card_size(size) // 2**20}M {image})")


def card_size(size: int) -> int:
    """The smallest power of two at least ``size`` bytes."""
    return 1 << max(size - 1, 1).bit_length()


def command(vm, kernel: Path, initramfs: Path, tree: Path, cmdline: str, netdev: str, monitor: Path) -> list[str]:
    """qemu-system-aarch64 for this card. The board's memory (1 GiB) and cores (4) are fixed by the machine."""
    return ["qemu-system-aarch64", "-accel", "tcg", "-machine", MACHINE, "-kernel", str(kernel),
            "-initrd", str(initramfs), "-dtb", str(tree), "-append", cmdline,
            "-drive", f"file={vm.image},format=raw,if=sd,cache=unsafe",
            # no PCI on a Pi: the network is a USB Ethernet adapter on the dwc2 host port (cdc_ether in the guest)
            "-netdev", netdev, "-device", "usb-net,netdev=net0",
            # the first serial port is the PL011 (Bluetooth on a Pi 3), the second the mini UART: ttyS1, the console
            "-serial", "null", "-serial", f"file:{vm.console}",
            "-display", "none", "-monitor", "none", "-qmp", f"unix:{monitor},server=on,wait=off", "-no-reboot"]


@dataclass(frozen=True)
class PinState:
    output: bool  # the pin's function is "output" (a pin a program claimed as input, or never touched, is not)
    level: bool


def gpio_pin(monitor: Monitor, pin: int) -> PinState:
    """A BCM2835 GPIO pin as the emulated chip holds it: its function and its level register bit."""
    select = monitor.read_word(GPIO_BASE + GPFSEL + 4 * (pin // 10))
    level = monitor.read_word(GPIO_BASE + GPLEV + 4 * (pin // 32))
    return PinState(output=(select >> 3 * (pin % 10)) & 7 == OUTPUT_FUNCTION, level=bool(level >> pin % 32 & 1))
