"""Requests for this device that the queue cannot take yet: held unacknowledged and handed over in arrival order.

The device session's Receive Maximum (v5) already keeps the broker from sending more than the queue can take, but
the broker does not always keep to it (mosquitto 2.0.11 sends up to twice as many when a session with a backlog is
resumed) and MQTT 3.1.1 has no such property (the broker's ``max_inflight_messages``, 20 by default, applies). A
request that arrives with the queue full is therefore not refused: it waits here, unacked, so a crash loses
nothing (the broker delivers it again), and is submitted as soon as a place frees. Fleet requests are not held: a
busy device answers them ``busy`` at once so that the requester can try a device that is free.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import ApplianceError, Cancelled, QueueFull
from appliance.generation.jobs import Requester

#: how often held requests are offered again when no MQTT answer frees a place (an HTTP one may have)
RETRY_SECONDS = 0.5


class HeldReply(Protocol):
    def refuse(self, rid: str | int | None, error: ApplianceError) -> None: ...

    def abandon(self, rid: str | int | None) -> None: ...


@dataclass(frozen=True)
class Held:
    rid: str | int | None
    requester: Requester  # only its own cancel stops it
    submit: Callable[[], None]  # raises QueueFull while there is no place
    reply: HeldReply


class Waiting:
    def __init__(self, on_refused: Callable[[ApplianceError], None]) -> None:
        self._lock = threading.Lock()  # held while submitting (keeps the order); replies are sent outside it
        self._held: deque[Held] = deque()
        self._timer: threading.Timer | None = None
        self._on_refused = on_refused
        self._closed = False

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, held: Held) -> None:
        """Submit now unless requests are already waiting (never overtake them) or the queue is full."""
        with self._lock:
            self._held.append(held)
        self.drain()

    def drain(self) -> None:
        """Submit held requests in order until the queue is full again."""
        while True:
            with self._lock:
                if not self._held or self._closed:
                    break
                held = self._held[0]
                try:
                    held.submit()
                except QueueFull:
                    self._arm()
                    return
                except ApplianceError as exc:
                    self._held.popleft()
                    refused: ApplianceError | None = exc
                else:
                    self._held.popleft()
                    refused = None
            if refused is not None:
                self._on_refused(refused)
                held.reply.refuse(held.rid, refused)

    def cancel(self, rid: str | int, requester: Requester) -> int:
        """Answer held requests with this id from this requester ``cancelled``; returns how many."""
        def hit(held: Held) -> bool:
            return held.rid == rid and held.requester == requester

        with self._lock:
            hits = [h for h in self._held if hit(h)]
            self._held = deque(h for h in self._held if not hit(h))
        for held in hits:
            cancelled = Cancelled("cancelled while waiting for a place in the queue")
            self._on_refused(cancelled)  # counted like every other reply
            held.reply.refuse(held.rid, cancelled)
        return len(hits)

    def close(self) -> None:
        """Stopping: held requests stay unacked, so the broker delivers them again after the restart. Idempotent."""
        with self._lock:
            self._closed = True
            held, self._held = list(self._held), deque()
            if self._timer is not None:
                self._timer.cancel()
        for each in held:
            each.reply.abandon(each.rid)

    def _arm(self) -> None:  # called with the lock held
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(RETRY_SECONDS, self.drain)
            self._timer.daemon = True
            self._timer.start()
