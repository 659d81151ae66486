"""The appliance's state, as everyone outside sees it: retained MQTT status, /readyz, /metrics, later LEDs.

One writer (the scheduler, later the supervisor) calls :meth:`StatusBoard.set`; listeners are told of every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from types import EllipsisType
from typing import Any

from appliance import __version__

log = logging.getLogger(__name__)

STATES = ("starting", "loading", "ready", "busy", "degraded", "error", "offline")
#: states in which a model is loaded and requests are being served
SERVING = ("ready", "busy")


@dataclass(frozen=True)
class Status:
    state: str = "starting"
    model: str | None = None
    reason: str = ""
    device: str = ""
    version: str = __version__
    since: float = 0.0  # wall-clock time of the last state change
    warnings: tuple[str, ...] = ()  # serving, but: under-voltage, warm, memory low ...

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["warnings"] = list(self.warnings)
        return body


Listener = Callable[[Status], None]


class StatusBoard:
    def __init__(self, device: str) -> None:
        self._lock = threading.Lock()
        self._status = Status(device=device, since=time.time())
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Status:
        return self._status

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def set(self, state: str, *, model: str | None | EllipsisType = ..., reason: str = "",
            warnings: tuple[str, ...] | None = None) -> None:
        """Change the state; listeners run only when something visible changed."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._lock:
            old = self._status
            kept = old.model if isinstance(model, EllipsisType) else model
            new = replace(old, state=state, reason=reason, model=kept,
                          warnings=old.warnings if warnings is None else warnings)
            if (new.state, new.model, new.reason, new.warnings) == (old.state, old.model, old.reason, old.warnings):
                return
            new = replace(new, since=time.time())
            self._status = new
            listeners = list(self._listeners)
        if new.state != old.state:
            log.info("status %s -> %s%s", old.state, new.state, f" ({reason})" if reason else "")
        for warning in set(new.warnings) - set(old.warnings):
            log.warning("%s", warning)
        for listener in listeners:
            try:
                listener(new)
            except Exception:
                log.exception("status listener failed")
