"""Exactly-once answers over at-least-once MQTT: acks that wait for the reply, and the de-duplication rule.

A request is acknowledged to the broker only after its final reply has itself been acknowledged by the broker
(PUBACK), so a request the broker accepted survives an appliance crash or restart: unacked, it is delivered again.

The rule (docs/protocol.md, "Repeats and redeliveries"): a *redelivery* is the broker sending the same message
again (the DUP flag set, after a reconnect); it is answered once. While the original is still being worked on the
redelivery is only acked with it; once answered, the stored final reply is published again (the first copy may
not have reached the requester) and the redelivery is acked. A *new* publish (DUP clear) is always a new request,
even when it reuses an id or correlation data: a sensor that reboots and counts from 1 again is answered. Answered
requests are remembered for ``window`` seconds, at most ``capacity`` of them and ``max_bytes`` of stored replies.

Durably (mqtt_journal.py): ``on_answered`` is called with the journal ticket of a request whose final reply the
broker acknowledged, before its acks are handed back, so the answer is on the card before the broker forgets it.

Locking: ``AckBook``'s lock is a leaf. Nothing is called while holding it, in particular never paho, whose own
locks are held while it runs our ``on_publish`` callback, nor ``on_answered``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from appliance.transports.mqtt_journal import Ticket

#: one delivery of a request, to ack on the connection it came by: (connection, mid, qos)
Delivery = tuple[Any, int, int]

#: how long a PUBACK that arrived before its publish() call returned is remembered (microseconds matter, not minutes)
EARLY_PUBACK_TTL = 10.0


@dataclass(frozen=True)
class StoredReply:
    """A final reply as it was published, kept to answer a redelivery of its request again."""

    topic: str
    correlation: bytes | None
    payload: bytes


@dataclass(eq=False)
class Pending:
    """One accepted request until its final reply is acknowledged; identity, not its key, tells two apart."""

    key: Hashable
    deliveries: set[Delivery] = field(default_factory=set)
    reply: StoredReply | None = None
    ticket: Ticket | None = None  # the delivery journal's name for it; None when the journal does not keep it


@dataclass(frozen=True)
class Seen:
    """What :meth:`AckBook.begin` found: ``state`` is 'new' (``pending`` to answer), 'in_progress' (a redelivery
    of a request being worked on: acked with it) or 'answered' (``pending`` carries the stored reply to publish
    again; its ack follows that publish's PUBACK)."""

    state: str
    pending: Pending | None = None


class AckBook:
    def __init__(self, *, window: float = 3600.0, capacity: int = 4096, max_bytes: int = 4 << 20,
                 clock: Callable[[], float] = time.monotonic,
                 on_answered: Callable[[Ticket], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._on_answered = on_answered
        self._window, self._capacity, self._max_bytes, self._clock = window, capacity, max_bytes, clock
        self._live: dict[Hashable, Pending] = {}  # key -> the latest request with it still in progress
        self._answered: OrderedDict[Hashable, tuple[float, StoredReply]] = OrderedDict()
        self._answered_bytes = 0
        self._awaiting_puback: dict[int, Pending] = {}  # reply mid -> request
        self._early_pubacks: dict[int, float] = {}

    def begin(self, key: Hashable, delivery: Delivery, *, redelivery: bool) -> Seen:
        """Record a delivered request under the rule above."""
        with self._lock:
            if redelivery:
                self._expire()
                if (live := self._live.get(key)) is not None:
                    live.deliveries.add(delivery)
                    return Seen("in_progress")
                if (answered := self._answered.get(key)) is not None:
                    return Seen("answered", Pending(key, {delivery}, answered[1]))
            pending = Pending(key, {delivery})
            self._live[key] = pending
            return Seen("new", pending)

    def join(self, key: Hashable, delivery: Delivery) -> bool:
        """Add a delivery to the request with this key that is in progress, acked with it; False when none is."""
        with self._lock:
            if (live := self._live.get(key)) is None:
                return False
            live.deliveries.add(delivery)
            return True

    def forget(self, pending: Pending) -> None:
        """Drop a request without acking it (shutdown): the broker will deliver it again."""
        with self._lock:
            if self._live.get(pending.key) is pending:
                del self._live[pending.key]

    def reply_sent(self, pending: Pending, reply_mid: int, reply: StoredReply) -> set[Delivery]:
        """The final reply went out as ``reply_mid``. Returns request acks that are due now (their PUBACK came
        back already); otherwise they are returned later by :meth:`puback`."""
        with self._lock:
            pending.reply = reply
            arrived = self._early_pubacks.pop(reply_mid, None)
            if arrived is None or time.monotonic() - arrived >= EARLY_PUBACK_TTL:
                self._awaiting_puback[reply_mid] = pending
                return set()
        return self._released(pending)

    def puback(self, reply_mid: int) -> set[Delivery]:
        """The broker acknowledged one of our publishes; returns the request acks it releases."""
        with self._lock:
            pending = self._awaiting_puback.pop(reply_mid, None)
            if pending is None:
                now = time.monotonic()
                self._early_pubacks[reply_mid] = now
                if len(self._early_pubacks) > 256:
                    self._early_pubacks = {m: t for m, t in self._early_pubacks.items()
                                           if now - t < EARLY_PUBACK_TTL}
                return set()
        return self._released(pending)

    def _released(self, answered: Pending) -> set[Delivery]:
        """The journal records the answer (flushed, outside the lock) while the request is still in progress here,
        and only then does it leave: a copy of it that the broker hands over meanwhile (on paho's thread, while the
        publishing thread answers) either joins it, and is acked with it, or finds the journal's answer. Left the
        other way round, a copy could find it gone from here and still open in the journal, and be answered again."""
        if self._on_answered is not None and answered.ticket is not None:
            self._on_answered(answered.ticket)
        with self._lock:
            return self._answer(answered)

    def stored(self) -> tuple[int, int]:
        """(answered requests remembered, bytes of their stored replies)."""
        with self._lock:
            return len(self._answered), self._answered_bytes

    def _answer(self, pending: Pending) -> set[Delivery]:
        if self._live.get(pending.key) is pending:
            del self._live[pending.key]
        if pending.reply is not None:
            self._drop(pending.key)
            self._answered[pending.key] = (self._clock(), pending.reply)
            self._answered_bytes += len(pending.reply.payload)
            self._expire()
        acks, pending.deliveries = pending.deliveries, set()
        return acks

    def _expire(self) -> None:
        oldest_kept = self._clock() - self._window
        while self._answered and (len(self._answered) > self._capacity or self._answered_bytes > self._max_bytes
                                  or next(iter(self._answered.values()))[0] < oldest_kept):
            self._drop(next(iter(self._answered)))

    def _drop(self, key: Hashable) -> None:
        entry = self._answered.pop(key, None)
        if entry is not None:
            self._answered_bytes -= len(entry[1].payload)


def handed_back(recall: Callable[[Ticket], str | None], ticket: Ticket, book: AckBook, key: Hashable,
                delivery: Delivery) -> str | None:
    """A request the broker hands over, which the delivery journal may know from before the restart (``recall``:
    DeliveryJournal.recall): 'answered' (ack it, answer nothing), 'joined' (added to the request in progress, acked
    with it), or None (not from before the restart, or never taken up since: the rule of :meth:`AckBook.begin`)."""
    state = recall(ticket)
    if state == "open":
        if book.join(key, delivery):
            return "joined"
        # gone from the book since the first look: answered meanwhile on the publishing thread, and a request
        # leaves the book only once the journal holds its answer (_released), so the journal says so now
        state = recall(ticket)
    return "answered" if state == "answered" else None
