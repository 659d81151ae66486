"""Exactly-once answers over at-least-once MQTT: duplicate detection and acks that wait for the reply.

A request is acknowledged to the broker only after its final reply has itself been acknowledged by the broker
(PUBACK), so a request the broker accepted survives an appliance crash or restart: unacked, it is delivered again.
Redeliveries (same correlation data or id, same reply topic) are recognised and answered once.

Locking: ``AckBook``'s lock is a leaf. Nothing is called while holding it, in particular never paho, whose own
locks are held while it runs our ``on_publish`` callback.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

#: one delivery of a request, to ack on the connection it came by: (connection, mid, qos)
Delivery = tuple[Any, int, int]

#: how long a PUBACK that arrived before its publish() call returned is remembered (microseconds matter, not minutes)
EARLY_PUBACK_TTL = 10.0


class AckBook:
    def __init__(self, answered_capacity: int = 4096) -> None:
        self._lock = threading.Lock()
        #: request key -> deliveries to ack, each (connection, mid, qos)
        self._inflight: dict[Hashable, set[Delivery]] = {}
        self._answered: OrderedDict[Hashable, None] = OrderedDict()
        self._answered_capacity = answered_capacity
        self._awaiting_puback: dict[int, Hashable] = {}  # reply mid -> request key
        self._early_pubacks: dict[int, float] = {}

    def begin(self, key: Hashable, delivery: Delivery) -> str:
        """Record a delivered request: 'new', 'in_progress' (a redelivery of one being worked on: its mid is
        acked with the original) or 'answered' (already answered: ack it and reply nothing)."""
        with self._lock:
            if key in self._answered:
                return "answered"
            if key in self._inflight:
                self._inflight[key].add(delivery)
                return "in_progress"
            self._inflight[key] = {delivery}
            return "new"

    def forget(self, key: Hashable) -> None:
        """Drop a request without acking it (shutdown): the broker will deliver it again."""
        with self._lock:
            self._inflight.pop(key, None)

    def reply_sent(self, key: Hashable, reply_mid: int) -> set[Delivery]:
        """The final reply went out as ``reply_mid``. Returns request acks that are due now (their PUBACK came
        back already); otherwise they are returned later by :meth:`puback`."""
        with self._lock:
            arrived = self._early_pubacks.pop(reply_mid, None)
            if arrived is not None and time.monotonic() - arrived < EARLY_PUBACK_TTL:
                return self._answer(key)
            self._awaiting_puback[reply_mid] = key
            return set()

    def puback(self, reply_mid: int) -> set[Delivery]:
        """The broker acknowledged one of our publishes; returns the request acks it releases."""
        with self._lock:
            key = self._awaiting_puback.pop(reply_mid, None)
            if key is None:
                now = time.monotonic()
                self._early_pubacks[reply_mid] = now
                if len(self._early_pubacks) > 256:
                    self._early_pubacks = {m: t for m, t in self._early_pubacks.items()
                                           if now - t < EARLY_PUBACK_TTL}
                return set()
            return self._answer(key)

    def _answer(self, key: Hashable) -> set[Delivery]:
        acks = self._inflight.pop(key, set())
        self._answered[key] = None
        while len(self._answered) > self._answered_capacity:
            self._answered.popitem(last=False)
        return acks
