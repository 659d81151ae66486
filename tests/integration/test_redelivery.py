"""The de-duplication rule (issue 10.1): a new publish that reuses an id or correlation data is a new request and
is answered; a broker *redelivery* of the same message (DUP flag, after the appliance's connection was taken over
and resumed) is answered once. On the old rule the second mosquitto_pub below got silence."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _finals(client, topic: str) -> list[dict]:
    return [b for m in client.messages if m.topic == topic and (b := json.loads(m.payload))["type"] != "chunk"]


def test_readme_example_run_twice_is_answered_twice(appliance, broker):
    """`mosquitto_pub -V mqttv5 ... -D publish correlation-data 2a` twice, with the stock clients."""
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.fail("mosquitto-clients is required (apt install mosquitto-clients); .ci/run installs it")
    port, reply_topic = str(broker.port), f"cli/{uuid.uuid4().hex}"
    sub = subprocess.Popen(["mosquitto_sub", "-p", port, "-V", "mqttv5", "-t", reply_topic, "-C", "2", "-W", "60"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for _ in range(2):
        subprocess.run(["mosquitto_pub", "-p", port, "-V", "mqttv5", "-q", "1", "-t", appliance.topic("generate"),
                        "-D", "publish", "response-topic", reply_topic, "-D", "publish", "correlation-data", "2a",
                        "-m", json.dumps({"prompt": "hello", "max_tokens": 4})], check=True)
        time.sleep(0.5)
    out, _ = sub.communicate(timeout=70)
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in replies] == ["result", "result"], replies


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_new_publish_reusing_an_id_is_answered(appliance_factory, mqtt_client, protocol):
    """A 3.1.1 sensor that reboots and sends {"id": "q1"} again, or a v5 client reusing correlation data."""
    app = appliance_factory(overrides={"mqtt": {"protocol": protocol}})
    client = mqtt_client(protocol)
    reply_topic = f"test/again/{uuid.uuid4().hex}"
    client.subscribe(reply_topic)
    for n in (1, 2, 3):
        body = {"id": "q1", "prompt": "a", "max_tokens": 2}
        if protocol == "5":
            client.publish(app.topic("generate"), body, response_topic=reply_topic, correlation=b"q1")
        else:
            client.publish(app.topic("generate"), {**body, "reply_to": reply_topic})
        client.wait_for(lambda m: m.topic == reply_topic, count=n)
    time.sleep(1)
    assert [f["type"] for f in _finals(client, reply_topic)] == ["result"] * 3


def _take_over_session(broker, client_id: str, protocol: str, hold: float = 1.0) -> list[tuple[bool, bytes]]:
    """Connect with the appliance's own client id and persistent session: the broker disconnects the appliance
    (session taken over) and hands its unacked requests to us, which we do not ack; then leave, so the appliance
    reconnects, resumes the session and gets them again with the DUP flag. Returns what we were handed."""
    handed: list[tuple[bool, bytes]] = []
    v5 = protocol == "5"
    intruder = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, manual_ack=True,
                           protocol=paho.MQTTv5 if v5 else paho.MQTTv311, **({} if v5 else {"clean_session": False}))
    intruder.on_message = lambda c, u, m: handed.append((m.dup, bytes(m.payload)))
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        intruder.connect(broker.host, broker.port, clean_start=False, properties=props)
    else:
        intruder.connect(broker.host, broker.port)
    intruder.loop_start()
    time.sleep(hold)
    intruder.disconnect()
    intruder.loop_stop()
    return handed


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_redelivery_of_a_request_in_progress_is_answered_once(appliance_factory, mqtt_client, broker,
                                                                      protocol):
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "request_timeout": 600},
                                     "mqtt": {"protocol": protocol}})
    client = mqtt_client(protocol)
    topic = f"test/redeliver/{uuid.uuid4().hex}"
    client.subscribe(topic)
    body = {"id": "long", "prompt": "a", "max_tokens": 3000, "stream": True}
    if protocol == "5":
        client.publish(app.topic("generate"), body, response_topic=topic, correlation=b"long")
    else:
        client.publish(app.topic("generate"), {**body, "reply_to": topic})
    client.wait_for(lambda m: m.topic == topic)  # chunks are flowing: the request is in progress, unacked
    handed = _take_over_session(broker, f"appliance-{app.device}", protocol)
    assert handed and all(dup for dup, _ in handed), handed  # the broker itself re-sent it, flagged DUP
    deadline = time.monotonic() + 60
    while "redelivery of request 'long', which is in progress" not in app.log_text():
        assert time.monotonic() < deadline, app.log_text()[-3000:]
        time.sleep(0.2)
    # still running (3000 tokens): stop it, so the one final reply comes now, whatever the speed of this machine
    client.cancel(app.topic("cancel"), "long", topic)
    client.wait_for(lambda m: m.topic == topic and json.loads(m.payload)["type"] != "chunk", timeout=60)
    time.sleep(2)  # a second answer would show up now
    finals = _finals(client, topic)
    assert len(finals) == 1 and finals[0]["error"]["code"] == "cancelled", finals
    assert app.metric('appliance_mqtt_redeliveries_total{state="in_progress"}') == 1
    ok = client.request(app.topic("generate"), {"prompt": "after", "max_tokens": 2})
    assert ok[-1]["type"] == "result"
