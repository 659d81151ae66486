"""The last hour of the board (temperature, throttle flags, memory) and the errors by code, kept in memory for the
operator page. Bounded by construction: one bucket per ``bucket_seconds`` for ``window_seconds``, and one row per
error code (the codes are a fixed set). Fed by the supervisor's readings and the error reporter; nothing of a
request's text is ever stored here (an error is kept as its code, its transport and the field it named).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError


@dataclass
class Bucket:
    """What the supervisor saw during one bucket: the hottest reading, every throttle flag, the least memory."""

    start: float
    temperature_c: float | None = None
    flags: set[str] = field(default_factory=set)
    available_mib: float | None = None

    def add(self, reading: dict[str, Any]) -> None:
        celsius = reading.get("temperature_c")
        if celsius is not None:
            self.temperature_c = celsius if self.temperature_c is None else max(self.temperature_c, celsius)
        throttle = reading.get("throttle") or {}
        self.flags.update(f for f in throttle.get("flags", ()) if not f.endswith("_occurred"))
        memory = reading.get("memory") or {}
        available = memory.get("available_mib")
        if available is not None:
            self.available_mib = available if self.available_mib is None else min(self.available_mib, available)


@dataclass(frozen=True)
class ErrorRecord:
    ts: float
    code: str
    transport: str
    param: str | None  # the request field the error named (never its value)


@dataclass
class ErrorCount:
    code: str
    count: int = 0
    last: ErrorRecord | None = None


class History:
    def __init__(self, window_seconds: float = 3600.0, bucket_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.bucket_seconds = bucket_seconds
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: deque[Bucket] = deque(maxlen=max(1, int(window_seconds // bucket_seconds)))
        self._by_code: dict[str, ErrorCount] = {}

    # -- feeding (supervisor thread, scheduler and transport threads) -------------------------------------------

    def on_reading(self, reading: dict[str, Any]) -> None:
        now = self._clock()
        start = now - now % self.bucket_seconds
        with self._lock:
            if not self._buckets or self._buckets[-1].start != start:
                self._buckets.append(Bucket(start))
            self._buckets[-1].add(reading)

    def on_error(self, transport: str, error: ApplianceError) -> None:
        record = ErrorRecord(self._clock(), error.code, transport, error.param)
        with self._lock:
            row = self._by_code.setdefault(error.code, ErrorCount(error.code))
            row.count += 1
            row.last = record

    # -- reading (HTTP threads) -----------------------------------------------------------------------------------

    def buckets(self) -> list[Bucket]:
        """Buckets of the last ``window_seconds``, oldest first."""
        horizon = self._clock() - self.window_seconds
        with self._lock:
            return [Bucket(b.start, b.temperature_c, set(b.flags), b.available_mib) for b in self._buckets
                    if b.start >= horizon]

    def errors_by_code(self) -> list[ErrorCount]:
        """One row per error code seen since start, the most recent first."""
        with self._lock:
            rows = [ErrorCount(r.code, r.count, r.last) for r in self._by_code.values()]
        return sorted(rows, key=lambda r: r.last.ts if r.last else 0, reverse=True)
