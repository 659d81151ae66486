"""Fast checks of the home-automation parts: discovery payloads and the schema check that guards them, the operator
page's bounded history, browser credentials, and the Wyoming listener's bounded reader and conversations."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from appliance.config import load_config
from appliance.errors import BadRequest, Busy
from appliance.history import History
from appliance.transports.ha_discovery import ENTITIES, discovery_configs, node_id
from appliance.transports.http import presented_key
from appliance.transports.mqtt_session import Topics
from appliance.transports.wyoming_talk import Conversations, WireProblem, guess_language, read_event, refusal
from tests.support import ha_schema


def _configs(**device):
    config = load_config(None, env={"APPLIANCE_HOMEASSISTANT_DISCOVERY": "true", "APPLIANCE_DEVICE_ID": "Pi-07.lab",
                                    **device})
    return discovery_configs(config, Topics.of("appliance", config.device.id, "appliance"), "Raspberry Pi 4 Model B")


def test_every_payload_passes_home_assistants_schema():
    configs = _configs()
    assert len(configs) == len(ENTITIES)
    for topic, payload in configs.items():
        assert ha_schema.validate(topic, payload) == [], topic
        assert "/appliance_Pi-07_lab/" in topic, "ids in topics are [a-zA-Z0-9_-]"
        assert payload["device"]["hw_version"] == "Raspberry Pi 4 Model B"


@pytest.mark.parametrize("change, complaint", [
    ({"unit_of_measurment": "°C"}, "unknown key 'unit_of_measurment'"),
    ({"unit_of_measurement": "C"}, "not a unit of device class temperature"),
    ({"state_class": "total"}, "does not go with device class temperature"),
    ({"options": ["a"]}, "options: must be used with device_class enum"),
    ({"availability": [{"topic": "x"}]}, "use one, not both"),
    ({"state_topic": "a/#/b"}, "state_topic"),
    ({"device": {"name": "x"}}, "needs at least one of identifiers and connections"),
    ({"origin": {"sw_version": "1"}}, "origin: name: required"),
    ({"icon": "robot"}, "icon"),
    ({"expire_after": -1}, "expire_after"),
    ({"default_entity_id": "sensor.appliance_pi-07_temperature"}, "default_entity_id"),
])
def test_the_schema_check_catches_what_home_assistant_refuses(change, complaint):
    topic, payload = next((t, p) for t, p in _configs().items() if t.endswith("/temperature/config"))
    errors = ha_schema.validate(topic, {**payload, **change})
    assert any(complaint in e for e in errors), errors


def test_node_ids_and_topics():
    assert node_id("pi-07.lab") == "appliance_pi-07_lab"
    assert ha_schema.validate("homeassistant/sensor/a b/x/config", {"state_topic": "t"}) != []


def test_history_is_bounded_and_keeps_no_text():
    clock = [1000.0]
    history = History(window_seconds=100, bucket_seconds=10, clock=lambda: clock[0])
    for i in range(50):
        clock[0] += 5
        history.on_reading({"temperature_c": 40 + i % 7, "throttle": {"flags": ["throttled", "throttled_occurred"]},
                            "memory": {"available_mib": 500 - i}})
    buckets = history.buckets()
    assert len(buckets) <= 10 and buckets[-1].flags == {"throttled"}
    assert all(b.temperature_c >= 40 for b in buckets) and buckets[-1].available_mib == 451
    for _ in range(5):
        history.on_error("mqtt", Busy("the queue is full"))
    clock[0] += 1
    history.on_error("http", BadRequest("'max_tokens' must be an integer, got 'my secret'", param="max_tokens"))
    rows = history.errors_by_code()
    assert [(r.code, r.count) for r in rows] == [("bad_request", 1), ("busy", 5)]
    assert rows[0].last.param == "max_tokens" and rows[0].last.transport == "http"
    assert "secret" not in repr(rows), "codes and field names only"


def test_browser_credentials():
    basic = "Basic " + base64.b64encode(b"anyone:the-key:with-colon").decode()
    assert presented_key(basic) == ("the-key:with-colon", True)
    assert presented_key("Bearer the-key") == ("the-key", False)
    assert presented_key("Basic !!!") == ("", True)
    assert presented_key("") == ("", False)


def _read(data: bytes):
    async def go():
        reader = asyncio.StreamReader(limit=64 * 1024)
        reader.feed_data(data)
        reader.feed_eof()
        return await read_event(reader)
    return asyncio.run(go())


def test_wyoming_reader_takes_events_and_refuses_garbage():
    body = json.dumps({"text": "hola"}).encode()
    event = _read(json.dumps({"type": "transcript", "data_length": len(body)}).encode() + b"\n" + body)
    assert event.type == "transcript" and event.data == {"text": "hola"}
    assert _read(b"") is None
    for garbage in (b"{]\n", b"[]\n", b'{"type": 1}\n', b'{"type": "x", "payload_length": 10000000}\n',
                    b'{"type": "x", "data_length": -1}\n'):
        with pytest.raises(WireProblem):
            _read(garbage)


def test_conversations_are_bounded():
    clock = [0.0]
    talks = Conversations(2, limit=3, idle_seconds=10, clock=lambda: clock[0])
    for i in range(3):
        talks.add("c", f"q{i}", f"a{i}")
    assert talks.history("c") == [("q1", "a1"), ("q2", "a2")]
    for n in range(5):
        talks.add(f"other{n}", "q", "a")
    assert talks.history("c") == [], "the oldest conversation made room"
    clock[0] = 100
    assert talks.history("other4") == [], "idle conversations expire"
    talks.add(None, "q", "a")  # no conversation id: nothing kept


def test_refusals_in_the_questions_language():
    assert guess_language("¿Qué hora es?") == "es" and guess_language("现在几点") == "zh"
    assert guess_language("What time is it?") == "en"
    assert "ocupado" in refusal("busy", "es-ES") and "稍后" in refusal("busy", "zh")
    assert refusal("no_such_code", "fr") == refusal("internal", "en")
