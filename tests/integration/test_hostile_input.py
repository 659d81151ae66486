"""Hostile JSON on both transports (issue 10.5): every kind is `bad_request` naming the problem, on HTTP and on MQTT
(v5 and 3.1.1), and the service keeps serving. On the old decoder 100,000 nested brackets were HTTP 500 `internal`
and no MQTT reply at all."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.fuzz_payloads import HOSTILE
from tests.support.harness import http_post


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_json_over_http_is_a_bad_request(appliance, route):
    for name, payload in HOSTILE.items():
        if route.endswith("chat/completions"):
            payload = payload.replace(b'"prompt"', b'"messages"') if b"messages" not in payload else payload
        status, body = http_post(appliance.http_url + route, payload)
        assert status == 400 and body["error"]["code"] == "bad_request", (name, status, body)
    assert http_post(appliance.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_hostile_json_over_mqtt_is_answered_with_bad_request(appliance, mqtt_client, protocol):
    client = mqtt_client(protocol)
    if protocol == "5":
        reply_topic = f"test/hostile/{uuid.uuid4().hex}"
        client.subscribe(reply_topic)
        for name, payload in HOSTILE.items():
            client.publish(appliance.topic("generate"), payload, response_topic=reply_topic,
                           correlation=name.encode())
        for name in HOSTILE:
            (final,) = client.replies(reply_topic, correlation=name.encode(), timeout=30)
            assert final["type"] == "error" and final["error"]["code"] == "bad_request", (name, final)
    else:  # 3.1.1: a payload that cannot be read names no reply topic: the answers come on the device's own
        client.subscribe(appliance.topic("reply"))
        for payload in HOSTILE.values():
            client.publish(appliance.topic("generate"), payload)
        finals = client.wait_for(lambda m: m.topic == appliance.topic("reply"), count=len(HOSTILE), timeout=30)
        codes = [json.loads(m.payload)["error"]["code"] for m in finals]
        assert codes == ["bad_request"] * len(HOSTILE), codes
    ok = client.request(appliance.topic("generate"), {"prompt": "a", "max_tokens": 2})
    assert ok[-1]["type"] == "result"


@pytest.mark.parametrize("reply_to", ["a\x1fb", "a\x7fb", "a\x85b", "a\ufffeb", "a\ufdd0b", "é" * 40_000])
def test_a_reply_topic_the_broker_would_refuse_is_a_bad_request_and_the_device_stays_connected(
        appliance, mqtt_client, reply_to):
    """Found by `make fuzz`: mosquitto closes a connection that publishes to a topic with a control character, a
    non-character or more than 65,535 bytes ("malformed packet"), and paho sends the same unacknowledged reply
    again on every reconnect, so one such `reply_to` took the device off MQTT for good. It must be refused like any
    bad field, on the device's own reply topic, and the device must keep serving."""
    client = mqtt_client("3.1.1")
    client.subscribe(appliance.topic("reply"))
    client.publish(appliance.topic("generate"), {"id": "odd", "prompt": "a", "max_tokens": 2, "reply_to": reply_to})
    (final,) = client.wait_for(lambda m: m.topic == appliance.topic("reply"), timeout=30)
    error = json.loads(final.payload)["error"]
    assert (error["code"], error["param"]) == ("bad_request", "reply_to"), error
    assert client.request(appliance.topic("generate"), {"prompt": "a", "max_tokens": 2})[-1]["type"] == "result"
    assert "Malformed" not in appliance.log_text()
