"""MQTT round trips against a real mosquitto and the real appliance process on a tiny real GGUF model."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.support.harness import http_get


def _final(replies: list[dict]) -> dict:
    assert replies, "no reply"
    return replies[-1]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("stream", [False, True])
def test_round_trip(appliance, mqtt_client, protocol, stream):
    client = mqtt_client(protocol)
    replies = client.request(appliance.topic("generate"),
                             {"prompt": "the cat is", "max_tokens": 12, "temperature": 0, "stream": stream})
    final = _final(replies)
    assert final["type"] == "result", final
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 12
    assert final["usage"]["prompt_tokens"] > 0
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 12
    assert final["timings"]["ttft_ms"] > 0 and final["timings"]["tokens_per_s"] > 0
    assert final["model"] == "tiny"
    assert final["text"]
    chunks = replies[:-1]
    if stream:
        assert chunks, "a streamed request gets chunks before its result"
        assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert "".join(c["delta"] for c in chunks) == final["text"]
        assert all(c["type"] == "chunk" and c["id"] == final["id"] for c in chunks)
    else:
        assert chunks == []


@pytest.mark.parametrize("stream", [False, True])
def test_appliance_in_mqtt_311_mode(appliance_factory, mqtt_client, stream):
    """With mqtt.protocol = "3.1.1" the appliance itself speaks 3.1.1: replies go to the payload's reply_to, carry
    the request's id, and have no v5 properties (no Content Type, no Correlation Data)."""
    app = appliance_factory(overrides={"mqtt": {"protocol": "3.1.1"}})
    assert "(MQTT 3.1.1)" in app.log_text()
    replies = mqtt_client("3.1.1").request(app.topic("generate"), {
        "id": "q-311", "prompt": "the cat is", "max_tokens": 6, "temperature": 0, "stream": stream})
    final = _final(replies)
    assert final["type"] == "result" and final["id"] == "q-311", final
    assert final["usage"]["completion_tokens"] == 6 and final["text"]
    chunks = replies[:-1]
    if stream:
        assert chunks and all(c["id"] == "q-311" for c in chunks)
        assert "".join(c["delta"] for c in chunks) == final["text"]
    else:
        assert chunks == []
    # a v5 client sees what the appliance attached: a 3.1.1 session cannot receive the Response Topic either, so
    # the reply goes to reply_to, not to the property
    watcher = mqtt_client("5")
    reply_to, ignored = f"test/311/{uuid.uuid4().hex}", f"test/311-ignored/{uuid.uuid4().hex}"
    watcher.subscribe(reply_to)
    watcher.subscribe(ignored)
    watcher.publish(app.topic("generate"), {"id": "v5-sender", "prompt": "x", "max_tokens": 2, "reply_to": reply_to},
                    response_topic=ignored, correlation=b"dropped")
    (msg,) = watcher.wait_for(lambda m: m.topic == reply_to and json.loads(m.payload)["type"] == "result")
    assert json.loads(msg.payload)["id"] == "v5-sender"
    assert getattr(msg.properties, "ContentType", None) is None
    assert getattr(msg.properties, "CorrelationData", None) is None
    assert not [m for m in watcher.messages if m.topic == ignored]


def test_correlation_data_is_echoed_byte_for_byte(appliance, mqtt_client):
    client = mqtt_client()
    correlation = bytes(range(256))  # not UTF-8, includes NUL
    reply_topic = f"test/{uuid.uuid4().hex}"
    client.subscribe(reply_topic)
    client.publish(appliance.topic("generate"), {"prompt": "x", "max_tokens": 2, "stream": True},
                   response_topic=reply_topic, correlation=correlation)
    client.wait_for(lambda m: m.topic == reply_topic and json.loads(m.payload)["type"] == "result")
    received = [m for m in client.messages if m.topic == reply_topic]
    assert len(received) >= 2
    assert all(m.properties.CorrelationData == correlation for m in received)
    assert all(m.properties.ContentType == "application/json" for m in received)  # none in 3.1.1 mode


def test_id_is_echoed_and_default_reply_topic(appliance, mqtt_client):
    """MQTT 3.1.1 without reply_to: the reply goes to <prefix>/<device>/reply with the request's id."""
    client = mqtt_client("3.1.1")
    client.subscribe(appliance.topic("reply"))
    client.publish(appliance.topic("generate"), {"id": 42, "prompt": "x", "max_tokens": 3})
    (msg,) = client.wait_for(lambda m: m.topic == appliance.topic("reply"))
    reply = json.loads(msg.payload)
    assert reply["id"] == 42 and reply["type"] == "result"


def test_chat_messages(appliance, mqtt_client):
    client = mqtt_client()
    final = _final(client.request(appliance.topic("generate"), {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 5, "temperature": 0}))
    assert final["type"] == "result" and final["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("payload, code, param", [
    (b"{not json", "bad_request", None),
    (b"\xff\xfe", "bad_request", None),
    (b"[1, 2]", "bad_request", None),
    (json.dumps({"prompt": 5}).encode(), "bad_request", "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), "bad_request", "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), "bad_request", "temperature"),
    (json.dumps({"prompt": "x", "messages": []}).encode(), "bad_request", "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "bad_request", "messages[0].role"),
    (json.dumps({"prompt": "x", "max_token": 3}).encode(), "bad_request", "max_token"),
    (json.dumps({"prompt": "x", "model": "nope"}).encode(), "unknown_model", "model"),
    (json.dumps({"prompt": "word " * 600}).encode(), "too_long", "prompt"),
])
def test_bad_input_gets_a_structured_error_and_the_service_keeps_serving(appliance, mqtt_client, payload, code,
                                                                          param):
    client = mqtt_client()
    final = _final(client.request(appliance.topic("generate"), payload))
    assert final["type"] == "error", final
    assert final["error"]["code"] == code
    assert final["error"]["message"]
    assert final["error"].get("param") == param
    ok = _final(client.request(appliance.topic("generate"), {"prompt": "still there?", "max_tokens": 2}))
    assert ok["type"] == "result"


def test_error_names_the_request_id(appliance, mqtt_client):
    client = mqtt_client("3.1.1")
    final = _final(client.request(appliance.topic("generate"), {"id": "abc-1", "prompt": 1}))
    assert final["id"] == "abc-1" and final["error"]["code"] == "bad_request"


def test_retained_status_and_clean_shutdown(appliance, mqtt_client):
    client = mqtt_client()
    client.subscribe(appliance.topic("status"))
    (msg,) = client.wait_for(lambda m: m.topic == appliance.topic("status") and m.retain)
    status = json.loads(msg.payload)
    assert status["state"] == "ready" and status["model"] == "tiny" and status["device"] == appliance.device
    assert status["version"]
    assert appliance.stop() == 0
    client.wait_for(lambda m: m.topic == appliance.topic("status") and json.loads(m.payload)["state"] == "offline")
    late = mqtt_client()
    late.subscribe(appliance.topic("status"))
    (msg,) = late.wait_for(lambda m: m.topic == appliance.topic("status"))
    assert msg.retain and json.loads(msg.payload)["state"] == "offline"


def test_last_will_marks_a_killed_appliance_offline(appliance, mqtt_client):
    client = mqtt_client()
    client.subscribe(appliance.topic("status"))
    client.wait_for(lambda m: m.topic == appliance.topic("status") and json.loads(m.payload)["state"] == "ready")
    appliance.kill()  # SIGKILL: no goodbye; keepalive is 5 s, the broker gives up after 1.5x
    (msg,) = client.wait_for(lambda m: m.topic == appliance.topic("status")
                             and json.loads(m.payload)["state"] == "offline", timeout=20)
    assert json.loads(msg.payload)["reason"] == "connection lost"


def test_queue_full_fleet_request_gets_busy_at_once_device_request_waits(appliance_factory, mqtt_client):
    """Live overload: a fleet request, which another device could serve, gets `busy` at once; a request for this
    device alone waits (the broker holds it) and is answered when a place frees. Cancels are never held back."""
    app = appliance_factory("slow", {"worker": {"max_queue": 1, "context_size": 4096}})
    # /readyz speaks of the model; a fleet request published before the shared subscription exists is lost
    deadline = time.monotonic() + 30
    while "MQTT (fleet session): subscribed" not in app.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    client = mqtt_client()
    topic = app.topic("generate")
    client.subscribe("test/q/#")
    long = {"prompt": "a", "max_tokens": 4000, "stream": True}
    client.publish(topic, {**long, "id": "long"}, response_topic="test/q/long", correlation=b"long")
    client.wait_for(lambda m: m.topic == "test/q/long")  # generating now
    client.publish(topic, {**long, "id": "waiting"}, response_topic="test/q/waiting", correlation=b"w")
    # the queue is full once "waiting" is in it: the fleet request below comes over another session, so without
    # this wait it may overtake "waiting" (whose journal record is flushed first) and take the place itself
    deadline = time.monotonic() + 20
    while b"appliance_queue_depth 1.0" not in http_get(app.http_url + "/metrics")[1]:
        assert time.monotonic() < deadline, "the second request never reached the queue"
        time.sleep(0.05)
    client.publish(topic, {"id": "third", "prompt": "a", "max_tokens": 4}, response_topic="test/q/third",
                   correlation=b"t")
    started = time.monotonic()
    refused = client.request("appliance/fleet/generate", {"id": "fleet", "prompt": "a", "max_tokens": 4},
                             reply_topic="test/q/fleet")
    assert time.monotonic() - started < 5, "busy must be immediate, not a wait"
    assert _final(refused)["error"]["code"] == "busy"
    assert not [m for m in client.messages if m.topic == "test/q/third"]  # waiting, not refused
    client.cancel(app.topic("cancel"), "long", "test/q/long")
    final = _final(client.replies("test/q/long", timeout=20))
    assert final["error"]["code"] == "cancelled"
    client.cancel(app.topic("cancel"), "waiting", "test/q/waiting")
    assert _final(client.replies("test/q/waiting", timeout=20))["error"]["code"] == "cancelled"
    assert _final(client.replies("test/q/third", timeout=60))["type"] == "result"


def test_request_timeout(appliance_factory, mqtt_client):
    app = appliance_factory("slow", {"worker": {"request_timeout": 1.5, "context_size": 4096}})
    client = mqtt_client()
    started = time.monotonic()
    final = _final(client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 4000}, timeout=30))
    assert final["error"]["code"] == "timeout"
    assert time.monotonic() - started < 10
    assert _final(client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 3}))["type"] == "result"


def test_mosquitto_command_line_clients(appliance, broker):
    """The stock mosquitto_pub/mosquitto_sub, MQTT v5 request/response with correlation data."""
    import shutil
    import subprocess
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.fail("mosquitto-clients is required (apt install mosquitto-clients); .ci/run installs it")
    port = str(broker.port)
    reply_topic = f"cli/{uuid.uuid4().hex}"
    sub = subprocess.Popen(["mosquitto_sub", "-p", port, "-V", "mqttv5", "-t", reply_topic, "-C", "1", "-W", "30"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["mosquitto_pub", "-p", port, "-V", "mqttv5", "-t", appliance.topic("generate"),
                    "-D", "publish", "response-topic", reply_topic, "-D", "publish", "correlation-data", "c1",
                    "-m", json.dumps({"prompt": "hello", "max_tokens": 4})], check=True)
    out, _ = sub.communicate(timeout=40)
    reply = json.loads(out)
    assert reply["type"] == "result" and reply["usage"]["completion_tokens"] == 4
