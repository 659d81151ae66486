"""The firmware's part of a Pi 3B boot that image/raspi.py does for QEMU: which config.txt lines a Pi 3B applies, the
SD card sizes QEMU takes, and the BCM2835 GPIO register bits a pin's state is read from. The boot itself is
tests/system/test_image_arm64.py."""

from __future__ import annotations

import pytest

from image import raspi

# Debian's raspi-firmware writes this (bookworm), and the image appends the CM4's section
DEBIAN_CONFIG = """\
# Do not modify this file!
arm_64bit=1

enable_uart=1
upstream_kernel=1

kernel=vmlinuz-6.1.0-50-arm64
# For details on the initramfs directive, see
initramfs initrd.img-6.1.0-50-arm64

# Inserted by /etc/default/raspi-firmware-custom
[cm4]
device_tree=bcm2711-rpi-cm4-io.dtb
[all]
"""


def test_a_pi_3b_applies_the_common_lines_and_its_own_section_only():
    more = "[pi4]\nkernel=other\n[pi3]\ncmdline=pi3.txt\n[all]\ndtparam=spi=on\n"
    settings = raspi.config_settings(DEBIAN_CONFIG + more)
    assert settings == {"arm_64bit": "1", "enable_uart": "1", "upstream_kernel": "1",
                        "kernel": "vmlinuz-6.1.0-50-arm64", "initramfs": "initrd.img-6.1.0-50-arm64",
                        "cmdline": "pi3.txt", "dtparam": "spi=on"}, "the CM4's and the Pi 4's lines are not a 3B's"


def test_comments_and_a_later_line_win():
    settings = raspi.config_settings("kernel=a # first\n#kernel=commented\nkernel = b\n[PI3]\nkernel=c\n")
    assert settings["kernel"] == "c"


@pytest.mark.parametrize(("size", "card"), [(2**30, 2**30), (2**30 + 1, 2**31), (1784 * 2**20, 2**31),
                                            (2060 * 2**20, 2**32)])
def test_the_card_is_the_next_power_of_two(size, card):
    assert raspi.card_size(size) == card


class FakeMonitor:
    """Guest physical memory as a dict of words (what QEMU's `xp` reads)."""

    def __init__(self, words: dict[int, int]) -> None:
        self.words = words

    def read_word(self, address: int) -> int:
        return self.words.get(address, 0)


def test_a_pins_function_and_level_come_from_its_own_register_bits():
    base = raspi.GPIO_BASE
    # GPIO17: function select register 1, bits 21-23; GPIO27: register 2, bits 21-23; levels in GPLEV0
    monitor = FakeMonitor({base + 0x04: 0b001 << 21 | 0b100 << 18, base + 0x08: 0b000 << 21,
                           base + 0x34: 1 << 17 | 1 << 16})
    assert raspi.gpio_pin(monitor, 17) == raspi.PinState(output=True, level=True)
    assert raspi.gpio_pin(monitor, 16) == raspi.PinState(output=False, level=True), "ALT0 is not an output"
    assert raspi.gpio_pin(monitor, 27) == raspi.PinState(output=False, level=False)
    monitor.words[base + 0x38] = 1 << (47 - 32)
    monitor.words[base + 0x10] = 0b001 << 21  # GPIO47: register 4, bits 21-23
    assert raspi.gpio_pin(monitor, 47) == raspi.PinState(output=True, level=True), "bank 1 (pins 32-53)"
