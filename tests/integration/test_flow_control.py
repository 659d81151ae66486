"""Flow control (issue 10.2): a backlog the broker kept while the appliance was down is answered in full, in order,
with no `busy`: the appliance's MQTT v5 Receive Maximum (one running + worker.max_queue) keeps the rest with the
broker until an answer frees a place, and what the broker sends beyond it (mosquitto 2.0.11 overshoots on a resumed
session; 3.1.1 has no Receive Maximum) waits unacked in the transport. On the old code 20 held requests got about 9
results and 11 `busy`."""

from __future__ import annotations

import json
import time
import uuid

import pytest


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_backlog_held_by_the_broker_is_answered_in_order_without_busy(appliance_factory, mqtt_client, protocol):
    app = appliance_factory(overrides={"mqtt": {"protocol": protocol}})
    client = mqtt_client(protocol)
    prefix = f"test/backlog/{uuid.uuid4().hex}"
    client.subscribe(prefix + "/#")
    assert client.request(app.topic("generate"), {"prompt": "warm up", "max_tokens": 2})[-1]["type"] == "result"
    assert app.stop() == 0
    ids = [f"b{i:02d}" for i in range(20)]
    for rid in ids:  # the broker keeps them in the appliance's persistent session
        body = {"id": rid, "prompt": f"request {rid}", "max_tokens": 8}
        if protocol == "5":
            client.publish(app.topic("generate"), body, response_topic=f"{prefix}/{rid}", correlation=rid.encode())
        else:
            client.publish(app.topic("generate"), {**body, "reply_to": f"{prefix}/{rid}"})
    app.start()
    client.wait_for(lambda m: m.topic.startswith(prefix), count=len(ids), timeout=180)
    time.sleep(1)
    finals = [json.loads(m.payload) for m in client.messages if m.topic.startswith(prefix)]
    codes = [f["error"]["code"] for f in finals if f["type"] == "error"]
    assert codes == [], f"{len(codes)} of {len(ids)} refused: {codes}"
    assert [f["id"] for f in finals] == ids  # answered once each, in the order they were published
    if protocol == "5":  # the harness runs with worker.max_queue = 4: one running + 4 waiting
        assert "receive maximum 5" in app.log_text()


def test_with_several_slots_the_window_holds_every_slot_and_the_backlog_is_answered(appliance_factory, mqtt_client):
    """worker.parallel = 3: the Receive Maximum is 3 running + 4 waiting; answers may overtake one another."""
    app = appliance_factory(overrides={"worker": {"parallel": 3}})
    client = mqtt_client("5")
    prefix = f"test/backlog/{uuid.uuid4().hex}"
    client.subscribe(prefix + "/#")
    assert client.request(app.topic("generate"), {"prompt": "warm up", "max_tokens": 2})[-1]["type"] == "result"
    assert app.stop() == 0
    ids = [f"p{i:02d}" for i in range(20)]
    for rid in ids:
        client.publish(app.topic("generate"), {"id": rid, "prompt": f"request {rid}", "max_tokens": 8},
                       response_topic=f"{prefix}/{rid}", correlation=rid.encode())
    app.start()
    client.wait_for(lambda m: m.topic.startswith(prefix), count=len(ids), timeout=180)
    time.sleep(1)
    finals = [json.loads(m.payload) for m in client.messages if m.topic.startswith(prefix)]
    assert [f["type"] for f in finals] == ["result"] * len(ids)
    assert sorted(f["id"] for f in finals) == ids  # each answered once
    assert "receive maximum 7" in app.log_text()
