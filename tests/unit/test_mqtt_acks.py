"""Ack bookkeeping: a request is acked only once its reply is acknowledged; a broker redelivery is answered once
(replaying the stored reply), a new publish that reuses a key is answered again; the memory is bounded."""

from __future__ import annotations

from appliance.transports.mqtt_acks import AckBook, StoredReply

REPLY = StoredReply("t", b"c", b'{"type":"result"}')


def _answered(book: AckBook, key: str, mid: int) -> None:
    seen = book.begin(key, ("c", mid, 1), redelivery=False)
    assert seen.state == "new" and seen.pending is not None
    book.reply_sent(seen.pending, mid + 1000, StoredReply("t", b"c", key.encode() * 10))
    book.puback(mid + 1000)


def test_ack_waits_for_the_reply_puback():
    book = AckBook()
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert seen.state == "new" and seen.pending is not None
    assert book.reply_sent(seen.pending, 10, REPLY) == set()
    assert book.puback(99) == set()
    assert book.puback(10) == {("c", 1, 1)}


def test_puback_before_the_publish_call_returns():
    book = AckBook()
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert book.puback(10) == set()  # the network thread was faster than the publishing thread
    assert seen.pending is not None and book.reply_sent(seen.pending, 10, REPLY) == {("c", 1, 1)}


def test_redelivery_while_in_progress_is_acked_with_the_original():
    book = AckBook()
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert book.begin("k", ("c", 5, 1), redelivery=True).state == "in_progress"
    assert seen.pending is not None
    book.reply_sent(seen.pending, 10, REPLY)
    assert book.puback(10) == {("c", 1, 1), ("c", 5, 1)}


def test_redelivery_of_an_answered_request_replays_its_reply():
    book = AckBook()
    _answered(book, "k", 1)
    seen = book.begin("k", ("c", 1, 1), redelivery=True)
    assert seen.state == "answered" and seen.pending is not None and seen.pending.reply == StoredReply("t", b"c",
                                                                                                      b"k" * 10)
    assert book.reply_sent(seen.pending, 20, seen.pending.reply) == set()
    assert book.puback(20) == {("c", 1, 1)}  # acked once the replayed reply is acknowledged


def test_new_publish_reusing_a_key_is_a_new_request():
    book = AckBook()
    _answered(book, "k", 1)
    assert book.begin("k", ("c", 2, 1), redelivery=False).state == "new"
    first = book.begin("j", ("c", 3, 1), redelivery=False)
    second = book.begin("j", ("c", 4, 1), redelivery=False)  # both in progress at once: two requests
    assert second.state == "new" and first.pending is not second.pending
    assert first.pending is not None and second.pending is not None
    book.reply_sent(first.pending, 30, REPLY)
    book.reply_sent(second.pending, 31, REPLY)
    assert book.puback(30) == {("c", 3, 1)} and book.puback(31) == {("c", 4, 1)}


def test_forget_leaves_the_request_unacked_and_not_answered():
    book = AckBook()
    seen = book.begin("k", ("c", 1, 1), redelivery=False)
    assert seen.pending is not None
    book.forget(seen.pending)
    assert book.begin("k", ("c", 1, 1), redelivery=True).state == "new"


def test_answered_memory_is_bounded_in_count_bytes_and_time():
    now = [0.0]
    book = AckBook(window=60, capacity=2, max_bytes=1 << 20, clock=lambda: now[0])
    for mid, key in enumerate("abc"):
        _answered(book, key, mid)
    assert book.begin("a", ("c", 9, 1), redelivery=True).state == "new"  # over capacity: the oldest went
    assert book.begin("c", ("c", 9, 1), redelivery=True).state == "answered"
    now[0] = 61.0
    assert book.begin("c", ("c", 9, 1), redelivery=True).state == "new"  # past the window
    small = AckBook(max_bytes=25)
    for mid, key in enumerate("xyz"):
        _answered(small, key, mid)  # 10 bytes each
    assert small.stored() == (2, 20)
