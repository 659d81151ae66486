"""systemd integration: sd_notify over a real datagram socket, and the unit files as systemd reads them."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import REPO

UNITS = REPO / "systemd"


def test_notify_socket_gets_ready_watchdog_status_stopping(appliance_factory, tmp_path):
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(30)
    messages: list[str] = []

    def receive_until(predicate, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages.append(server.recv(4096).decode())
            if predicate():
                return
        raise TimeoutError(messages)

    app = appliance_factory(overrides={"supervisor": {"interval": 0.2}},
                            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    receive_until(lambda: any("READY=1" in m for m in messages))
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=ready: tiny" in ready
    start = len(messages)
    receive_until(lambda: sum("WATCHDOG=1" in m for m in messages[start:]) >= 3)  # pings keep coming
    assert sum("READY=1" in m for m in messages) == 1
    assert app.stop() == 0
    receive_until(lambda: any("STOPPING=1" in m for m in messages), timeout=10)
    server.close()


def test_notifier_abstract_socket():
    from appliance.supervisor.systemd import Notifier
    name = f"appliance-test-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval == 30.0
    notifier.ready("ready: m")
    notifier.ready("ready: m")  # only once
    notifier.status("busy: m")
    notifier.watchdog()
    notifier.stopping()
    got = [server.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=ready: m", "STATUS=busy: m", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    assert Notifier({}).enabled is False
    server.close()


@pytest.fixture
def units(tmp_path) -> Path:
    """The units with ExecStart pointing at this checkout's interpreter (verify checks that it exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is required (apt install systemd); .ci/run installs it")
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/appliance/current/venv/bin/appliance", f"{sys.executable} -m appliance")
        text = text.replace("/usr/local/sbin/appliance-install-bundle", shutil.which("true"))  # not on this machine
        (out / unit.name).write_text(text)
    return out


def test_units_verify(units):
    result = subprocess.run(["systemd-analyze", "verify", *[str(u) for u in units.glob("*.service")]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "appliance.service" not in result.stderr, result.stderr


def test_unit_is_hardened(units):
    """The exposure docs/operations.md records; a regression in hardening fails here."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(units / "appliance.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.0, line
    recorded = (REPO / "docs" / "operations.md").read_text()
    assert f"exposure {exposure}" in recorded, f"docs/operations.md should record: {line.strip()}"
    text = (UNITS / "appliance.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "MemoryHigh=", "MemoryMax=", "OOMPolicy=",
                    "ProtectSystem=strict", "StateDirectory=appliance", "NoNewPrivileges=yes", "PrivateTmp=yes",
                    "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "SupplementaryGroups=gpio"):
        assert setting in text, setting


def test_watchdog_pings_stop_when_the_scheduler_hangs(tmp_path, catalog_path, monkeypatch):
    """A sink that never returns hangs the scheduler loop: the watchdog pings stop, so systemd would restart us."""
    import threading

    from appliance.messages import Done
    from appliance.protocol import parse_generate
    from appliance.supervisor import loop as supervisor_module
    from appliance.supervisor.systemd import Notifier
    from tests.support.harness import in_process_service

    monkeypatch.setattr(supervisor_module, "HEARTBEAT_LIMIT", 1.0)
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(0.5)
    service = in_process_service(tmp_path, catalog_path, {"supervisor": {"interval": 0.1}})
    service.notifier = service.supervisor.notifier = Notifier({"NOTIFY_SOCKET": address})

    def pings(seconds: float) -> int:
        """WATCHDOG=1 messages sent during the next ``seconds`` (older ones waiting in the socket are dropped)."""
        server.setblocking(False)
        while True:
            try:
                server.recv(4096)
            except BlockingIOError:
                break
        server.settimeout(0.5)
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                count += server.recv(4096).decode().count("WATCHDOG=1")
        return count

    release, stuck = threading.Event(), threading.Event()

    class StuckSink:
        def send(self, job, event):
            if isinstance(event, Done):
                stuck.set()
                release.wait(30)  # a bug that blocks the scheduler thread

    try:
        service.start()
        deadline = time.monotonic() + 30
        while service.status.current.state != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pings(1.0) >= 5
        service.scheduler.submit(parse_generate({"prompt": "a", "max_tokens": 2}), StuckSink(), "test")
        # the generation itself may take seconds on a loaded machine: count from when the loop is stuck
        assert stuck.wait(60), "the job finished"
        time.sleep(1.5)  # the heartbeat goes stale
        assert pings(1.0) == 0, "no watchdog pings while the scheduler loop is stuck"
        release.set()
        assert pings(1.5) >= 5, "pings resume once the loop turns again"
    finally:
        release.set()
        service.close()
        server.close()
