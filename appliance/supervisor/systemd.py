"""sd_notify(3) without libsystemd: READY=1, WATCHDOG=1, STATUS=, STOPPING=1 over ``$NOTIFY_SOCKET``.

Does nothing when the service does not run under systemd with ``Type=notify`` (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace
        self._address = ("\0" + path[1:]) if path.startswith("@") else path
        self.enabled = bool(path)
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        watched = bool(usec) and (not pid or pid == str(os.getpid()))
        #: systemd's WatchdogSec, in seconds (None: no watchdog); ping at least twice per interval
        self.watchdog_interval = int(usec) / 1e6 if watched and usec and usec.isdigit() else None
        self._warned = False
        self.ready_sent = False
        self._stopping = False
        self._last_status = ""

    def _send(self, *fields: str) -> None:
        if not self.enabled:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self._address, exc)

    def ready(self, status: str) -> None:
        if not self.ready_sent and not self._stopping:
            self.ready_sent = True
            self._last_status = status
            self._send("READY=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._stopping = True
        self._send("STOPPING=1", "STATUS=stopping")
