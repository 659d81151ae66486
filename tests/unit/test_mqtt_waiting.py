"""Requests held unacked for a place in the queue (transports/mqtt_waiting.py): a cancel stops only the held
requests of its own requester, and each gets its one `cancelled` reply."""

from __future__ import annotations

from appliance.errors import ApplianceError, QueueFull
from appliance.generation.jobs import Requester
from appliance.transports.mqtt_waiting import Held, Waiting


class Reply:
    def __init__(self) -> None:
        self.refused: list[tuple[object, str]] = []
        self.abandoned = 0

    def refuse(self, rid: str | int | None, error: ApplianceError) -> None:
        self.refused.append((rid, error.code))

    def abandon(self, rid: str | int | None) -> None:
        self.abandoned += 1


def _full() -> None:
    raise QueueFull("full")


def test_a_cancel_stops_only_its_own_requesters_held_request():
    counted: list[str] = []
    waiting = Waiting(lambda exc: counted.append(exc.code))
    sensor1, sensor2 = Requester(account="sensor1"), Requester(account="sensor2")
    mine, theirs, anonymous = Reply(), Reply(), Reply()
    waiting.offer(Held("r1", sensor1, _full, mine))
    waiting.offer(Held("r1", sensor2, _full, theirs))
    waiting.offer(Held("r1", Requester(reply_to="sensor1"), _full, anonymous))
    assert len(waiting) == 3
    assert waiting.cancel("r1", sensor2) == 1
    assert theirs.refused == [("r1", "cancelled")] and mine.refused == [] and anonymous.refused == []
    assert waiting.cancel("r1", Requester(reply_to="elsewhere")) == 0
    assert waiting.cancel("r1", sensor2) == 0, "answered once"
    assert theirs.refused == [("r1", "cancelled")]
    assert waiting.cancel("r1", sensor1) == 1 and mine.refused == [("r1", "cancelled")]
    assert len(waiting) == 1 and counted == ["cancelled", "cancelled"]
    waiting.close()
    assert anonymous.abandoned == 1 and anonymous.refused == []


def test_held_requests_are_submitted_in_order_when_a_place_frees():
    waiting = Waiting(lambda exc: None)
    submitted: list[str] = []
    room = [False]

    def submit(name: str):
        def go() -> None:
            if not room[0]:
                raise QueueFull("full")
            submitted.append(name)
        return go

    me = Requester(reply_to="t")
    for name in ("a", "b"):
        waiting.offer(Held(name, me, submit(name), Reply()))
    room[0] = True
    waiting.drain()
    waiting.close()
    assert submitted == ["a", "b"]
