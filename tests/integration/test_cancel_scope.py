"""Cancels are scoped to their requester (issue 10.6): with the shipped ACL, the account named by the cancel topic;
on the anonymous loopback broker, the reply destination the request named. A cancel from anyone else changes
nothing; the requester's own cancel stops its request at every stage (held for a queue seat, with the moderation
filter, queued, running) with one `cancelled` reply and no token generated for one that had not started."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.support import tiny_models, tiny_onnx
from tests.support.harness import MqttClient
from tests.support.shipped_broker import ShippedBroker

USERS = {"appliance": "pw-appliance-0", "sensor1": "pw-sensor1-00", "sensor2": "pw-sensor2-00"}
SLOW = {"worker": {"context_size": 4096}}
LONG = {"prompt": "a", "max_tokens": 4000, "stream": True}  # ~10 s on the slow model: cancelled, or stopped here
SHORT = {"prompt": "a", "max_tokens": 300, "stream": True}  # long enough to be running when a cancel arrives


def _replies(client: MqttClient, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in client.messages if m.topic == topic]


def _final(client: MqttClient, topic: str, timeout: float = 60) -> dict:
    client.wait_for(lambda m: m.topic == topic and json.loads(m.payload)["type"] != "chunk", timeout=timeout)
    (final,) = [r for r in _replies(client, topic) if r["type"] != "chunk"]
    return final


def _only_final(client: MqttClient, topic: str, wait: float = 1.0) -> dict:
    """The one reply a request got: its final one, with no chunk before it and nothing after it."""
    final = _final(client, topic)
    time.sleep(wait)  # a second reply, or a late chunk, would show up now
    assert _replies(client, topic) == [final], _replies(client, topic)
    return final


# -- with accounts: the shipped ACL -----------------------------------------------------------------------------

@pytest.fixture
def shipped(shipped_broker):
    return shipped_broker(USERS)


def _sensor(broker: ShippedBroker, user: str) -> MqttClient:
    client = MqttClient(broker.host, broker.lan_port, username=user, password=USERS[user])
    client.subscribe(f"replies/{user}/#")
    return client


def test_another_account_cannot_cancel_a_request_its_own_cancel_can(shipped, appliance_factory, tmp_path):
    password = tmp_path / "mqtt-password"
    password.write_text(USERS["appliance"] + "\n")
    app = appliance_factory("slow", {**SLOW, "mqtt": {"port": shipped.port, "username": "appliance",
                                                      "password_file": str(password)}})
    sensor1, sensor2 = _sensor(shipped, "sensor1"), _sensor(shipped, "sensor2")
    generate, cancel = app.topic("generate"), app.topic("cancel")
    mine, theirs = "replies/sensor1/job", "replies/sensor2/job"
    # long enough to keep sensor2's request queued while its cancels arrive (300 tokens ended first on a loaded CI),
    # and fewer chunks than the shipped broker queues for a client (max_queued_messages 1000): with 1500 at 500 tok/s
    # a test client that fell behind on a loaded CI had its final reply dropped by the broker
    sensor1.publish(generate + "/sensor1", {**LONG, "max_tokens": 900, "id": "job"}, response_topic=mine,
                    correlation=b"1")
    sensor1.wait_for(lambda m: m.topic == mine)  # generating
    # sensor2 sends a request with the same id (queued behind sensor1's) and cancels "job" under its own name, on
    # the device and on the fleet topic: that stops its own request only
    sensor2.publish(generate + "/sensor2", {**LONG, "id": "job"}, response_topic=theirs, correlation=b"2")
    time.sleep(0.5)  # queued
    sensor2.publish(cancel + "/sensor2", {"id": "job"})
    sensor2.publish("appliance/fleet/cancel/sensor2", {"id": "job"})
    sensor2.publish(cancel + "/sensor1", {"id": "job"})  # another's name: the broker drops it
    assert _only_final(sensor2, theirs)["error"]["code"] == "cancelled"
    result = _final(sensor1, mine, timeout=300)
    assert result["type"] == "result" and result["finish_reason"] == "length", result

    own = "replies/sensor1/own"
    sensor1.publish(generate + "/sensor1", {**LONG, "id": "own"}, response_topic=own, correlation=b"3")
    sensor1.wait_for(lambda m: m.topic == own)
    sensor1.publish(cancel + "/sensor1", {"id": "own"})
    assert _final(sensor1, own, timeout=30)["error"]["code"] == "cancelled"
    assert app.metric('appliance_requests_total{outcome="cancelled",transport="mqtt"}') == 2


# -- without accounts: the anonymous loopback broker ------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_cancel_naming_another_reply_destination_changes_nothing(appliance_factory, mqtt_client, protocol):
    app = appliance_factory("slow", {**SLOW, "mqtt": {"protocol": protocol}})
    requester, stranger = mqtt_client(protocol), mqtt_client(protocol)
    prefix = f"test/scope/{uuid.uuid4().hex}"
    requester.subscribe(prefix + "/#")
    running, queued = f"{prefix}/running", f"{prefix}/queued"
    # the running one long enough to keep the other queued while five cancels arrive (300 tokens ended first on a
    # loaded CI, and the queued one started streaming before its cancel came)
    for rid, topic, body in (("running", running, {**LONG, "max_tokens": 1500}), ("queued", queued, LONG)):
        if protocol == "5":
            requester.publish(app.topic("generate"), {**body, "id": rid}, response_topic=topic,
                              correlation=rid.encode())
        else:
            requester.publish(app.topic("generate"), {**body, "id": rid, "reply_to": topic})
        if rid == "running":
            requester.wait_for(lambda m: m.topic == running)
    for rid in ("running", "queued"):  # the right id, but another requester's reply destination, or none
        stranger.cancel(app.topic("cancel"), rid, f"{prefix}/elsewhere")
        stranger.cancel("appliance/fleet/cancel", rid, None)
    requester.cancel(app.topic("cancel"), "queued", queued)  # the requester's own: stops the queued one
    assert _only_final(requester, queued)["error"]["code"] == "cancelled"
    result = _final(requester, running, timeout=120)
    assert result["type"] == "result" and result["finish_reason"] == "length", result


# -- earlier stages -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_cancel_while_waiting_for_a_queue_seat_is_scoped_and_honoured(appliance_factory, mqtt_client, protocol):
    """max_queue 1: one running, one queued, so a third request for this device waits for a seat: v5 keeps it with
    the broker (the Receive Maximum is full, and the cancel overtakes it at QoS 0), 3.1.1 in the appliance, unacked."""
    app = appliance_factory("slow", {"worker": {"max_queue": 1, "context_size": 4096}, "mqtt": {"protocol": protocol}})
    client, stranger = mqtt_client(protocol), mqtt_client(protocol)
    prefix = f"test/seat/{uuid.uuid4().hex}"
    client.subscribe(prefix + "/#")
    for rid in ("running", "queued", "held"):
        if protocol == "5":
            client.publish(app.topic("generate"), {**LONG, "id": rid}, response_topic=f"{prefix}/{rid}",
                           correlation=rid.encode())
        else:
            client.publish(app.topic("generate"), {**LONG, "id": rid, "reply_to": f"{prefix}/{rid}"})
        if rid == "running":
            client.wait_for(lambda m: m.topic == f"{prefix}/running")
    app.wait_status(lambda s: s["state"] == "busy")
    time.sleep(0.5)  # the third waits now
    stranger.cancel(app.topic("cancel"), "held", f"{prefix}/elsewhere")
    stranger.cancel(app.topic("cancel"), "held", None)
    for rid in ("running", "queued"):  # seats free: the third runs
        client.cancel(app.topic("cancel"), rid, f"{prefix}/{rid}")
        assert _final(client, f"{prefix}/{rid}")["error"]["code"] == "cancelled"
    client.wait_for(lambda m: m.topic == f"{prefix}/held", timeout=30)
    assert _replies(client, f"{prefix}/held")[0]["type"] == "chunk", "another requester's cancel changed nothing"
    client.cancel(app.topic("cancel"), "held", f"{prefix}/held")
    assert _final(client, f"{prefix}/held")["error"]["code"] == "cancelled"

    # the requester's own cancel, while the request waits for a seat: no token, one reply
    for rid in ("seat-0", "seat-1", "seat-2"):
        body = {**LONG, "id": rid}
        if protocol == "5":
            client.publish(app.topic("generate"), body, response_topic=f"{prefix}/{rid}", correlation=rid.encode())
        else:
            client.publish(app.topic("generate"), {**body, "reply_to": f"{prefix}/{rid}"})
        if rid == "seat-0":
            client.wait_for(lambda m: m.topic == f"{prefix}/seat-0")
    time.sleep(0.5)  # "seat-1" queued, "seat-2" waits
    client.cancel(app.topic("cancel"), "seat-2", f"{prefix}/seat-2")
    time.sleep(0.5)
    for rid in ("seat-1", "seat-0"):  # seats free: nothing runs for "seat-2"
        client.cancel(app.topic("cancel"), rid, f"{prefix}/{rid}")
        assert _final(client, f"{prefix}/{rid}")["error"]["code"] == "cancelled"
    assert _only_final(client, f"{prefix}/seat-2", wait=2)["error"]["code"] == "cancelled"
    assert app.metric('appliance_requests_total{outcome="cancelled",transport="mqtt"}') == 6


@pytest.fixture(scope="module")
def moderated_catalog(models_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moderated")
    guard = tiny_onnx.write_text_classifier(d / "guard.onnx", ["forbidden"])
    catalog = d / "catalog.toml"
    catalog.write_text(tiny_models.catalog_entry("slow", models_dir / "slow.gguf", absolute=True, template="chatml")
                       + tiny_onnx.text_classifier_entry(guard))
    return catalog


def _onnx_worker(app) -> psutil.Process:
    """The ONNX child (the moderation filter's classifier), told from the inference worker by its OOM score."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(app.proc.pid).children(recursive=True):
            try:
                if Path(f"/proc/{child.pid}/oom_score_adj").read_text().strip() == "700":
                    return child
            except OSError:
                continue
        time.sleep(0.2)
    raise AssertionError("no ONNX worker process")


def test_a_cancel_while_the_moderation_filter_looks_is_scoped_and_honoured(appliance_factory, mqtt_client,
                                                                          moderated_catalog):
    app = appliance_factory("slow", {**SLOW, "models": {"catalog": str(moderated_catalog)},
                                     "moderation": {"model": "guard", "block": "flagged", "threshold": 0.5}})
    client, stranger = mqtt_client(), mqtt_client()
    prefix = f"test/moderating/{uuid.uuid4().hex}"
    client.subscribe(prefix + "/#")
    warm = client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 2})[-1]  # classifier loaded
    assert warm["type"] == "result", warm
    tokens = app.metric("appliance_completion_tokens_total")
    worker = _onnx_worker(app)
    os.kill(worker.pid, signal.SIGSTOP)  # the classifier is looking, for as long as the test needs
    try:
        for rid in ("other", "mine"):
            client.publish(app.topic("generate"), {**SHORT, "id": rid}, response_topic=f"{prefix}/{rid}",
                           correlation=rid.encode())
        time.sleep(0.5)
        stranger.cancel(app.topic("cancel"), "other", f"{prefix}/elsewhere")
        client.cancel(app.topic("cancel"), "mine", f"{prefix}/mine")
        cancelled = _final(client, f"{prefix}/mine", timeout=10)  # answered at once, the classifier still stopped
        assert cancelled["error"]["code"] == "cancelled", cancelled
        assert _replies(client, f"{prefix}/other") == []
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    result = _final(client, f"{prefix}/other", timeout=120)
    assert result["type"] == "result" and result["finish_reason"] == "length", result
    time.sleep(1)
    assert [r["type"] for r in _replies(client, f"{prefix}/mine")] == ["error"], "no token, one reply"
    assert app.metric("appliance_completion_tokens_total") == tokens + 300, "none for the cancelled one"
