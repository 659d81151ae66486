"""Cancels kept for requests the broker still holds (transports/mqtt_cancels.py)."""

from __future__ import annotations

import time

from appliance.generation.jobs import Requester
from appliance.transports import mqtt_cancels
from appliance.transports.mqtt_cancels import EarlyCancels

ME, OTHER = Requester(reply_to="me/r"), Requester(reply_to="other/r")


def test_a_kept_cancel_stops_only_its_requesters_request_once():
    early = EarlyCancels(ttl=60)
    early.keep("q1", ME)
    assert not early.take("q1", OTHER) and not early.take("q2", ME)
    assert not early.take("q1", Requester(account="me/r"))
    assert early.take("q1", ME)
    assert not early.take("q1", ME), "used up: a later request with the id runs"


def test_a_kept_cancel_expires_or_is_forgotten_when_it_found_its_request():
    early = EarlyCancels(ttl=0.05)
    early.keep("old", ME)
    time.sleep(0.1)
    assert not early.take("old", ME)
    early = EarlyCancels(ttl=60)
    early.keep("here", ME)
    early.forget("here", ME)
    assert not early.take("here", ME)


def test_kept_cancels_are_bounded(monkeypatch):
    monkeypatch.setattr(mqtt_cancels, "LIMIT", 3)
    early = EarlyCancels(ttl=60)
    for n in range(5):
        early.keep(n, ME)
    assert [early.take(n, ME) for n in range(5)] == [False, False, True, True, True]
