"""The delivery journal: which MQTT requests this device accepted and which it answered, kept on the card so that a
power cut neither loses an accepted request nor answers one twice (docs/protocol.md, "Repeats and redeliveries").

The acks in mqtt_acks.py already hold a request's ack back until its final reply has reached the broker, but they
live in memory, and mosquitto keeps its own state in memory between saves. After a cut the broker may hand back a
request the device had answered (its ack was lost with the broker's memory), with the DUP flag set or not, and the
device would answer it again. So, for each request of the device's own session:

1. as it is accepted, an *accepted* record (enough to answer it later: its topic, payload, v5 Response Topic and
   Correlation Data) is appended to ``requests`` and flushed (fsync);
2. once its final reply is acknowledged by the broker, an *answered* record (a digest of the request's key and one
   of its payload: no prompt, no completion) is appended to ``answered`` and flushed, and only then is the request
   acked to the broker; its accepted record is then dropped from ``requests`` (truncated when nothing else is
   open, else rewritten), so prompt text sits on the card only until the request is answered (the truncation
   reaches the card with the file system's next commit).

At start-up :attr:`DeliveryJournal.unanswered` lists the requests accepted and never answered (to be answered
again), and :meth:`DeliveryJournal.from_before_start` tells a request the broker hands back that the journal
already knew: answered before the cut, or being answered again now.

Each record is framed (length, CRC-32, JSON), so a record cut off by a power cut is recognised and skipped; the
file is then rewritten without it. Rewrites go through safefs (temporary file, fsync, rename, directory fsync).
Answered records are kept for ``keep_answered`` seconds (``mqtt.dedupe_window``), at most :data:`CAPACITY` of
them; ``answered`` is rewritten when it holds more than twice what is kept. Those seconds are the journal's own
clock, time the device was on: it resumes after a restart from the last answer it recorded, and never reads the
wall clock, which a Pi with no battery-backed clock sets from its last save at boot and moves when NTP or an
operator sets it (a jump forward would forget answers the broker is about to hand back; one backward would keep
them too long).

Locking: one lock, a leaf, held while writing and flushing; it is taken on paho's network thread (the caller
must not hold paho's or the ack book's locks, see mqtt_acks.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.release.safefs import Directory

log = logging.getLogger(__name__)

#: the journal's directory under ``device.state_dir``
JOURNAL_DIR = "mqtt-journal"
REQUESTS, ANSWERED = "requests", "answered"
#: answered requests remembered at most (about 120 bytes each on the card)
CAPACITY = 4096
#: a journal file larger than this is not read (a bound, not a working size: each holds a few KiB in use)
READ_LIMIT = 256 << 20
#: record frame: payload length and CRC-32 of the payload, big-endian
_FRAME = struct.Struct(">II")


@dataclass(frozen=True)
class Ticket:
    """What the journal knows a request by: digests of its key (reply topic + correlation data, id or payload;
    mqtt.py) and of its payload, so a new publish that reuses a key with another payload is another request."""

    key: str
    digest: str

    @classmethod
    def of(cls, key: Hashable, payload: bytes) -> Ticket:
        return cls(hashlib.sha256(repr(key).encode()).hexdigest()[:32], hashlib.sha256(payload).hexdigest()[:32])


@dataclass(frozen=True)
class Accepted:
    """One accepted request as it arrived, enough to answer it after a restart."""

    ticket: Ticket
    topic: str
    payload: bytes
    response_topic: str | None  # the v5 Response Topic (3.1.1 requests name theirs in the payload)
    correlation: bytes | None
    seq: int = 0  # the journal's record number: a request sent again after its answer is open again

    def to_record(self) -> dict[str, Any]:
        return {"kind": "accepted", "key": self.ticket.key, "digest": self.ticket.digest, "topic": self.topic,
                "payload": _b64(self.payload), "response_topic": self.response_topic,
                "correlation": None if self.correlation is None else _b64(self.correlation), "seq": self.seq}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Accepted:
        correlation = record.get("correlation")
        return cls(Ticket(str(record["key"]), str(record["digest"])), str(record["topic"]),
                   base64.b64decode(record["payload"]), record.get("response_topic"),
                   None if correlation is None else base64.b64decode(correlation), int(record.get("seq", 0)))


@dataclass(frozen=True)
class Answer:
    """When a request was answered: the journal's clock (seconds on, for the window) and its record number."""

    at: float
    seq: int

    def to_record(self, ticket: Ticket) -> dict[str, Any]:
        return {"kind": "answered", "key": ticket.key, "digest": ticket.digest, "at": round(self.at, 3),
                "seq": self.seq}


class DeliveryJournal:
    def __init__(self, directory: Path, *, keep_answered: float,
                 clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.Lock()
        self._keep, self._ticks = keep_answered, clock or time.monotonic
        self._dir = Directory(directory, create=True, mode=0o700)
        self._open: dict[Ticket, Accepted] = {}  # accepted, not answered yet
        self._answered: OrderedDict[Ticket, Answer] = OrderedDict()
        self._answered_in_file = 0  # records in the answered file, kept or not
        for record in self._load(ANSWERED):
            ticket = Ticket(str(record["key"]), str(record["digest"]))
            self._answered[ticket] = Answer(float(record["at"]), int(record.get("seq", 0)))
            self._answered_in_file += 1
        for record in self._load(REQUESTS):
            accepted = Accepted.from_record(record)
            answer = self._answered.get(accepted.ticket)
            if answer is None or answer.seq < accepted.seq:  # never answered, or sent again after its answer
                self._open[accepted.ticket] = accepted
        self._seq = max([0] + [a.seq for a in self._answered.values()] + [a.seq for a in self._open.values()])
        # the journal's clock goes on from the last answer recorded: time switched off does not count
        self._epoch, self._started = max([0.0] + [a.at for a in self._answered.values()]), self._ticks()
        self._expire()
        #: accepted before this start and never answered: to be answered again, oldest first
        self.unanswered: list[Accepted] = list(self._open.values())
        self._before_start = set(self._open) | set(self._answered)
        # start from files that hold exactly what is kept: no torn tail to append after, no answered prompts
        self._rewrite(REQUESTS, [a.to_record() for a in self._open.values()])
        self._rewrite_answered()
        self._appenders = {name: self._append_fd(name) for name in (REQUESTS, ANSWERED)}

    def recall(self, ticket: Ticket) -> str | None:
        """What the journal knew of this request at start-up, as it stands now: 'answered' (before the cut, or
        since the start-up), 'open' (accepted and not answered yet), or None (not from before the start-up: the
        in-memory rule of mqtt_acks.py applies)."""
        with self._lock:
            if ticket not in self._before_start:
                return None
            self._expire()  # an answer older than the window is forgotten: the request counts as a new one
            return "open" if ticket in self._open else "answered" if ticket in self._answered else None

    def accepted(self, request: Accepted) -> None:
        """Record an accepted request, flushed to the card before this returns."""
        with self._lock:
            self._seq += 1
            request = dataclasses.replace(request, seq=self._seq)
            self._open[request.ticket] = request
            try:
                self._append(REQUESTS, request.to_record())
            except OSError as exc:  # a full or failing card: the request is still answered, only not durably
                log.error("MQTT journal: could not record an accepted request: %s", exc)

    def answered(self, ticket: Ticket) -> None:
        """Record that the request's final reply reached the broker, flushed before this returns (the caller acks
        the request to the broker after it), and drop its prompt from the card."""
        with self._lock:
            self._answered.pop(ticket, None)
            self._seq += 1
            self._answered[ticket] = Answer(self._now(), self._seq)
            was_open = self._open.pop(ticket, None) is not None
            try:
                self._record_answer(ticket, was_open)
            except OSError as exc:  # as in accepted(): serving goes on; this answer may be given again after a cut
                log.error("MQTT journal: could not record an answer: %s", exc)

    def _record_answer(self, ticket: Ticket, was_open: bool) -> None:
        self._answered_in_file += 1
        self._append(ANSWERED, self._answered[ticket].to_record(ticket))
        self._expire()
        if self._answered_in_file > 2 * len(self._answered) + 64:
            self._rewrite_answered()
        if not was_open:
            return
        if self._open:  # the answered prompt leaves the card now, not at the next quiet moment
            self._rewrite(REQUESTS, [a.to_record() for a in self._open.values()])
        else:
            # nothing open: empty the file in place, not flushed. Correctness does not need it (the answered record
            # is flushed), and each flush costs the card a commit of the file system's journal (about 20 KiB,
            # docs/operations.md); ext4 commits the truncation within its commit interval.
            os.ftruncate(self._appenders[REQUESTS], 0)

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        with self._lock:
            for fd in self._appenders.values():
                os.close(fd)
            self._appenders.clear()
            self._dir.close()

    # -- files -------------------------------------------------------------------------------------------------

    def _load(self, name: str) -> list[dict[str, Any]]:
        data = self._dir.read(name, limit=READ_LIMIT) or b""
        records: list[dict[str, Any]] = []
        offset = 0
        while offset < len(data):
            end = _record_end(data, offset)
            body = None if end is None else _decode(data[offset + _FRAME.size:end])
            if end is None or body is None:  # a write cut off by a power cut (or a damaged card): not trusted
                log.warning("MQTT journal: skipped %d bytes of a torn record at the end of %s",
                            len(data) - offset, self._dir.path / name)
                break
            records.append(body)
            offset = end
        return records

    def _append(self, name: str, record: dict[str, Any]) -> None:
        fd = self._appenders[name]
        frame = _frame(record)
        written = 0
        while written < len(frame):
            written += os.write(fd, frame[written:])
        os.fsync(fd)

    def _append_fd(self, name: str) -> int:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._dir.fd)
        os.fchmod(fd, 0o600)
        return fd

    def _rewrite(self, name: str, records: list[dict[str, Any]]) -> None:
        self._dir.write(name, b"".join(_frame(r) for r in records), mode=0o600)
        if name in getattr(self, "_appenders", {}):  # the old descriptor points at the replaced file
            os.close(self._appenders[name])
            self._appenders[name] = self._append_fd(name)

    def _rewrite_answered(self) -> None:
        self._rewrite(ANSWERED, [answer.to_record(ticket) for ticket, answer in self._answered.items()])
        self._answered_in_file = len(self._answered)

    def _now(self) -> float:
        return self._epoch + (self._ticks() - self._started)

    def _expire(self) -> None:
        oldest_kept = self._now() - self._keep
        while self._answered and (len(self._answered) > CAPACITY
                                  or next(iter(self._answered.values())).at < oldest_kept):
            self._answered.popitem(last=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _frame(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _record_end(data: bytes, offset: int) -> int | None:
    """Where the record at ``offset`` ends, or None when it is cut off or its checksum does not match."""
    if offset + _FRAME.size > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, offset)
    end: int = offset + _FRAME.size + length
    if end > len(data) or zlib.crc32(data[offset + _FRAME.size:end]) != crc:
        return None
    return end


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
