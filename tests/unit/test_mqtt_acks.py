"""Ack bookkeeping: a request is acked only once its reply is acknowledged, and is answered once."""

from __future__ import annotations

from appliance.transports.mqtt_acks import AckBook


def test_ack_waits_for_the_reply_puback():
    book = AckBook()
    assert book.begin("k", ("c", 1, 1)) == "new"
    assert book.reply_sent("k", reply_mid=10) == set()
    assert book.puback(99) == set()
    assert book.puback(10) == {("c", 1, 1)}
    assert book.begin("k", ("c", 2, 1)) == "answered"


def test_puback_before_the_publish_call_returns():
    book = AckBook()
    book.begin("k", ("c", 1, 1))
    assert book.puback(10) == set()  # the network thread was faster than the publishing thread
    assert book.reply_sent("k", reply_mid=10) == {("c", 1, 1)}


def test_redelivery_while_in_progress_is_acked_with_the_original():
    book = AckBook()
    book.begin("k", ("c", 1, 1))
    assert book.begin("k", ("c", 5, 1)) == "in_progress"
    book.reply_sent("k", 10)
    assert book.puback(10) == {("c", 1, 1), ("c", 5, 1)}


def test_forget_leaves_the_request_unacked_and_not_answered():
    book = AckBook()
    book.begin("k", ("c", 1, 1))
    book.forget("k")
    assert book.begin("k", ("c", 1, 1)) == "new"


def test_answered_memory_is_bounded():
    book = AckBook(answered_capacity=2)
    for mid, key in enumerate("abc"):
        book.begin(key, ("c", 1, 1))
        book.reply_sent(key, mid)
        book.puback(mid)
    assert book.begin("a", ("c", 1, 1)) == "new"
    assert book.begin("c", ("c", 1, 1)) == "answered"
