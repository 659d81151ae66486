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
from typing import Protocol

from appliance.errors import ApplianceError, Cancelled, QueueFull

#: how often held requests are offered again when no MQTT answer frees a place (an HTTP one may have)
RETRY_SECONDS = 0.5


class HeldReply(Protocol):
    def refuse(self, rid: str | int | None, error: ApplianceError) -> None: ...

    def abandon(self, rid: str | int | None) -> None: ...


#: (request id, submit: raises QueueFull while there is no place, the reply)
Held = tuple[str | int | None, Callable[[], None], HeldReply]


class Waiting:
    def __init__(self, on_refused: Callable[[ApplianceError], None]) -> None:
        self._lock = threading.Lock()  # held while submitting (keeps the order); replies are sent outside it
        self._held: deque[Held] = deque()
        self._timer: threading.Timer | None = None
        self._on_refused = on_refused
        self._closed = False

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, rid: str | int | None, submit: Callable[[], None], reply: HeldReply) -> None:
        """Submit now unless requests are already waiting (never overtake them) or the queue is full."""
        with self._lock:
            self._held.append((rid, submit, reply))
        self.drain()

    def drain(self) -> None:
        """Submit held requests in order until the queue is full again."""
        while True:
            with self._lock:
                if not self._held or self._closed:
                    break
                rid, submit, reply = self._held[0]
                try:
                    submit()
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
                reply.refuse(rid, refused)

    def cancel(self, rid: str | int) -> int:
        """Answer held requests with this id ``cancelled``; returns how many."""
        with self._lock:
            hit = [h for h in self._held if h[0] == rid]
            self._held = deque(h for h in self._held if h[0] != rid)
        for held_rid, _, reply in hit:
            reply.refuse(held_rid, Cancelled("cancelled while waiting for a place in the queue"))
        return len(hit)

    def close(self) -> None:
        """Stopping: held requests stay unacked, so the broker delivers them again after the restart. Idempotent."""
        with self._lock:
            self._closed = True
            held, self._held = list(self._held), deque()
            if self._timer is not None:
                self._timer.cancel()
        for rid, _, reply in held:
            reply.abandon(rid)

    def _arm(self) -> None:  # called with the lock held
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(RETRY_SECONDS, self.drain)
            self._timer.daemon = True
            self._timer.start()
