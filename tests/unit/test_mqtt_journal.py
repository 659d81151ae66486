"""The delivery journal (issue 12.3): accepted requests survive a restart until answered, answered ones are
recognised after it, a record torn by a power cut is skipped, prompts leave the card once answered, and the
files stay bounded."""

from __future__ import annotations

import dataclasses
import os
import stat
import time

from appliance.transports import mqtt_journal
from appliance.transports.mqtt_acks import AckBook, StoredReply, handed_back
from appliance.transports.mqtt_journal import JOURNAL_DIR, Accepted, DeliveryJournal, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _request(n: int, prompt: str = "secret prompt") -> Accepted:
    payload = f'{{"id": "r{n}", "prompt": "{prompt} {n}"}}'.encode()
    return Accepted(Ticket.of(("replies/x", "cd", f"c{n}".encode()), payload), "appliance/d/generate", payload,
                    "replies/x", f"c{n}".encode())


def _as_sent(requests: list[Accepted]) -> list[Accepted]:
    """Without the record numbers the journal gave them."""
    return [dataclasses.replace(r, seq=0) for r in requests]


def _journal(tmp_path, clock=None, keep: float = 3600.0) -> DeliveryJournal:
    return DeliveryJournal(tmp_path / JOURNAL_DIR, keep_answered=keep, clock=clock or Clock())


def test_accepted_and_not_answered_is_answered_again_after_a_restart(tmp_path):
    journal = _journal(tmp_path)
    first, second, third = _request(1), _request(2), _request(3)
    for request in (first, second, third):
        journal.accepted(request)
    journal.answered(second.ticket)
    journal.close()  # a power cut: nothing more is written

    again = _journal(tmp_path)
    assert _as_sent(again.unanswered) == [first, third]  # oldest first, every field as it arrived
    assert again.recall(first.ticket) == "open"
    assert again.recall(second.ticket) == "answered"
    assert again.recall(_request(4).ticket) is None  # never seen: the in-memory rule applies
    again.answered(first.ticket)
    assert again.recall(first.ticket) == "answered"  # a broker redelivery after its second answer is only acked
    again.close()


def test_the_same_request_sent_again_after_its_answer_is_open_again(tmp_path):
    """The README's mosquitto_pub run twice (same correlation data, same payload): the power goes while the second
    is being answered; it is answered after the restart, not taken for the first."""
    journal = _journal(tmp_path)
    request = _request(1)
    journal.accepted(request)
    journal.answered(request.ticket)
    journal.accepted(request)
    journal.close()
    again = _journal(tmp_path)
    assert _as_sent(again.unanswered) == [request]
    assert again.recall(request.ticket) == "open"
    again.answered(request.ticket)
    again.close()
    assert _journal(tmp_path).unanswered == []


def test_requests_of_this_run_are_not_recalled(tmp_path):
    """A new publish repeating one answered in this run is the in-memory rule's (answered again unless DUP)."""
    journal = _journal(tmp_path)
    request = _request(1)
    journal.accepted(request)
    journal.answered(request.ticket)
    assert journal.recall(request.ticket) is None
    journal.close()


def test_same_key_with_another_payload_is_another_request():
    key = ("replies/x", "id", "q1")
    assert Ticket.of(key, b'{"id": "q1", "prompt": "a"}') != Ticket.of(key, b'{"id": "q1", "prompt": "b"}')
    assert Ticket.of(key, b"x") == Ticket.of(key, b"x")


def test_prompt_text_leaves_the_card_once_answered(tmp_path):
    journal = _journal(tmp_path)
    requests_file = tmp_path / JOURNAL_DIR / mqtt_journal.REQUESTS
    first, second = _request(1, "alpha"), _request(2, "bravo")
    journal.accepted(first)
    journal.accepted(second)
    journal.answered(first.ticket)
    data = requests_file.read_bytes()
    assert b"alpha" not in data and b"prompt" not in data  # base64 in the file: look for the encoded prompt
    assert Accepted.from_record(mqtt_journal._decode(data[8:])).payload == second.payload
    journal.answered(second.ticket)
    assert requests_file.stat().st_size == 0
    answered = (tmp_path / JOURNAL_DIR / mqtt_journal.ANSWERED).read_bytes()
    assert b"prompt" not in answered and len(answered) < 2 * 160  # digests only
    journal.close()


def test_files_are_private(tmp_path):
    _journal(tmp_path).close()
    directory = tmp_path / JOURNAL_DIR
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in (mqtt_journal.REQUESTS, mqtt_journal.ANSWERED):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


def test_a_torn_last_record_is_skipped_and_appends_go_on_after_the_good_ones(tmp_path, caplog):
    journal = _journal(tmp_path)
    first, second = _request(1), _request(2)
    journal.accepted(first)
    journal.accepted(second)
    journal.close()
    requests_file = tmp_path / JOURNAL_DIR / mqtt_journal.REQUESTS
    whole = requests_file.read_bytes()
    requests_file.write_bytes(whole[:-7])  # the power went while the second record was being written

    again = _journal(tmp_path)
    assert _as_sent(again.unanswered) == [first]
    assert "torn record" in caplog.text
    third = _request(3)
    again.accepted(third)  # written after the first record, not after the torn bytes
    again.close()
    assert _as_sent(_journal(tmp_path).unanswered) == [first, third]


def test_a_damaged_record_ends_the_file(tmp_path):
    journal = _journal(tmp_path)
    journal.accepted(_request(1))
    journal.close()
    requests_file = tmp_path / JOURNAL_DIR / mqtt_journal.REQUESTS
    data = bytearray(requests_file.read_bytes())
    data[12] ^= 0xFF  # a flipped bit: the checksum no longer matches
    requests_file.write_bytes(bytes(data))
    assert _journal(tmp_path).unanswered == []


def test_answered_records_are_bounded_by_the_window_and_the_file_is_compacted(tmp_path):
    clock = Clock()
    journal = _journal(tmp_path, clock, keep=60.0)
    answered_file = tmp_path / JOURNAL_DIR / mqtt_journal.ANSWERED
    old = _request(0)
    journal.accepted(old)
    journal.answered(old.ticket)
    clock.now += 61
    sizes = []
    for n in range(1, 400):
        request = _request(n)
        journal.accepted(request)
        journal.answered(request.ticket)
        clock.now += 1  # one a second: about 60 are kept
        sizes.append(answered_file.stat().st_size)
    journal.close()
    record = sizes[0]
    assert max(sizes) < (2 * 61 + 66) * record  # rewritten whenever it holds twice what is kept
    again = _journal(tmp_path, clock, keep=60.0)
    assert again.recall(old.ticket) is None  # older than the window: a new request
    assert again.recall(_request(399).ticket) == "answered"
    assert again.recall(_request(300).ticket) is None
    again.close()


def test_the_window_counts_time_on_and_never_reads_the_wall_clock(tmp_path, monkeypatch):
    """A Pi has no battery-backed clock: after a cut it boots with the time of its last save, and NTP or an operator
    may then move the clock by days. An answer the broker may hand back is remembered for the window of time on,
    whatever the wall clock says, and the time spent switched off does not count."""
    wall, ticks = Clock(), Clock()
    monkeypatch.setattr(time, "time", wall)
    monkeypatch.setattr(time, "monotonic", ticks)
    journal = DeliveryJournal(tmp_path / JOURNAL_DIR, keep_answered=60.0)
    request = _request(1)
    journal.accepted(request)
    ticks.now += 30
    journal.answered(request.ticket)
    journal.close()
    wall.now += 7 * 86400  # the clock set a week forward while it was off
    ticks.now = 12.0  # a new boot: the monotonic clock starts again, below where it was
    again = DeliveryJournal(tmp_path / JOURNAL_DIR, keep_answered=60.0)
    assert again.recall(request.ticket) == "answered"
    wall.now -= 30 * 86400  # and a month back: still nothing read from it
    ticks.now += 59
    assert again.recall(request.ticket) == "answered"
    ticks.now += 2  # 61 s on since the answer: out of the window
    assert again.recall(request.ticket) is None
    again.close()


def test_the_capacity_bounds_answered_records(tmp_path, monkeypatch):
    monkeypatch.setattr(mqtt_journal, "CAPACITY", 5)
    journal = _journal(tmp_path)
    for n in range(8):
        journal.accepted(_request(n))
        journal.answered(_request(n).ticket)
    journal.close()
    again = _journal(tmp_path)
    assert [again.recall(_request(n).ticket) for n in range(8)] == [None] * 3 + ["answered"] * 5
    again.close()


def test_an_unwritable_card_does_not_stop_serving(tmp_path, caplog):
    journal = _journal(tmp_path)
    for fd in journal._appenders.values():
        os.close(fd)
    journal._appenders = {name: os.open(os.devnull, os.O_RDONLY) for name in journal._appenders}
    request = _request(1)
    journal.accepted(request)  # logged, not raised: the request is still answered
    journal.answered(request.ticket)
    assert "could not record an accepted request" in caplog.text
    assert "could not record an answer" in caplog.text
    journal.close()


def test_the_ack_book_records_the_answer_before_handing_back_the_acks():
    recorded: list[Ticket] = []
    book = AckBook(on_answered=recorded.append)
    ticket = _request(1).ticket
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert seen.pending is not None
    seen.pending.ticket = ticket
    assert book.join("k", ("c", 7, 1))  # a redelivery of it after a restart: acked with it
    assert not book.join("other", ("c", 8, 1))
    book.reply_sent(seen.pending, 10, StoredReply("t", None, b"{}"))
    assert recorded == []  # no PUBACK yet: not answered
    assert book.puback(10) == {("c", 1, 1), ("c", 7, 1)}
    assert recorded == [ticket]
    untracked = book.begin("u", ("c", 2, 1), redelivery=False)  # not journalled (fleet, QoS 0, journal off)
    assert untracked.pending is not None
    book.reply_sent(untracked.pending, 11, StoredReply("t", None, b"{}"))
    book.puback(11)
    assert recorded == [ticket]


def _open_after_a_restart(tmp_path) -> tuple[DeliveryJournal, Accepted]:
    before = DeliveryJournal(tmp_path, keep_answered=3600)
    request = _request(1)
    before.accepted(request)
    before.close()
    journal = DeliveryJournal(tmp_path, keep_answered=3600)
    assert journal.recall(request.ticket) == "open"
    return journal, request


def test_a_copy_handed_over_while_the_answer_is_being_recorded_joins_the_request(tmp_path):
    """The broker's copy of a request answered again after a restart comes in on paho's thread just as the publishing
    thread records the answer: the request is still in the book then, so the copy is acked with it."""
    journal, request = _open_after_a_restart(tmp_path)
    copies: list[str | None] = []

    def record(ticket: Ticket) -> None:
        copies.append(handed_back(journal.recall, ticket, book, "k", ("c", 7, 1)))
        journal.answered(ticket)

    book = AckBook(on_answered=record)
    seen = book.begin("k", ("c", 1, 1), redelivery=False)  # the journal's own copy, answered again
    assert seen.pending is not None
    seen.pending.ticket = request.ticket
    assert book.puback(10) == set()  # the PUBACK before the publish call returned: answered on the publishing thread
    assert book.reply_sent(seen.pending, 10, StoredReply("t", None, b"{}")) == {("c", 1, 1), ("c", 7, 1)}
    assert copies == ["joined"]
    assert handed_back(journal.recall, request.ticket, book, "k", ("c", 8, 1)) == "answered"  # a later copy
    journal.close()


def test_a_copy_whose_request_is_answered_between_the_two_looks_is_only_acked(tmp_path):
    """The journal says 'open', then the publishing thread answers the request whole before the copy can join it:
    the second look finds the answer, and the copy is not taken for a new request (answered twice)."""
    journal, request = _open_after_a_restart(tmp_path)
    book = AckBook(on_answered=journal.answered)
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert seen.pending is not None
    seen.pending.ticket = request.ticket
    book.reply_sent(seen.pending, 10, StoredReply("t", None, b"{}"))
    looks: list[str | None] = []

    def recall(ticket: Ticket) -> str | None:
        looks.append(journal.recall(ticket))
        if len(looks) == 1:
            assert book.puback(10) == {("c", 1, 1)}  # answered meanwhile
        return looks[-1]

    assert handed_back(recall, request.ticket, book, "k", ("c", 7, 1)) == "answered"
    assert looks == ["open", "answered"]
    journal.close()
