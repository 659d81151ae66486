"""This machine's address on its network, for tests that must tell a loopback-only listener from one the network
reaches (connecting to 127.0.0.1 cannot show the difference)."""

from __future__ import annotations

import subprocess

import pytest


def lan_address() -> str:
    """The first global IPv4 address of this machine; the test fails (it cannot prove anything) without one."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        return line.split()[3].split("/")[0]
    pytest.fail("this test needs a non-loopback IPv4 address on the machine (none found by `ip addr`)")
