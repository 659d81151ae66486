"""Structured output through llama.cpp's grammar sampler, on the real appliance: the OpenAI client's
response_format in both shapes, a raw GBNF grammar, the MQTT fields (with the parsed result), and the refusals.

The tiny test model writes noise; under a grammar even noise must come out as JSON of the schema's shape, which is
what makes these tests able to fail (without the grammar the answers do not parse)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.support.harness import http_post

openai = pytest.importorskip("openai")

SCHEMA = {"type": "object", "properties": {
    "mood": {"enum": ["happy", "sad", "tired"]},
    "level": {"type": "integer", "minimum": 1, "maximum": 5},
    "ok": {"type": "boolean"},
    "pair": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
             "maxItems": 2}},
    "required": ["mood", "level", "ok", "pair"]}
CHAT = [{"role": "user", "content": "how are you?"}]


@pytest.fixture
def client(appliance):
    return openai.OpenAI(base_url=appliance.http_url + "/v1", api_key="unused", timeout=120)


def test_unconstrained_noise_is_not_json(client):
    """The control: what the grammar changes (this model's free text does not parse)."""
    text = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, seed=1).choices[0]
    with pytest.raises(ValueError):
        json.loads(text.message.content or "")


def test_json_schema_answers_validate(client):
    for seed in range(8):
        reply = client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=120, seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": SCHEMA}})
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)
        assert reply.choices[0].finish_reason == "stop"


def test_json_object_mode_streamed(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=300, seed=4, stream=True,
                                            response_format={"type": "json_object"},
                                            extra_body={"grammar": None})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_raw_grammar(client, appliance):
    reply = client.completions.create(model="tiny", prompt="answer:", max_tokens=10, seed=2,
                                      extra_body={"grammar": 'root ::= ("yes" | "no") "!"'})
    assert reply.choices[0].text in ("yes!", "no!")
    status, body = http_post(appliance.http_url + "/v1/completions",
                             {"prompt": "a", "grammar": "root ::= missing-rule", "max_tokens": 3})
    assert status == 400 and body["error"]["param"] == "grammar"
    reply = client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert reply.choices[0].text is not None, "a bad grammar must not hurt the worker"


def test_cut_json_is_truncated(client, appliance):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}}}
    status, reply = http_post(appliance.http_url + "/v1/chat/completions", body)
    assert status == 422 and reply["error"]["code"] == "truncated" and reply["error"]["param"] == "max_tokens"


def test_unenforceable_keyword_is_refused(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                          "uniqueItems": True}}}}})
    assert "uniqueItems" in str(error.value)


def test_mqtt_format_and_json_schema(appliance, mqtt_client):
    client = mqtt_client()
    topic = appliance.topic("generate")
    reply = client.request(topic, {"id": "s1", "messages": CHAT, "json_schema": SCHEMA, "max_tokens": 120,
                                   "seed": 3})[-1]
    assert reply["type"] == "result", reply
    jsonschema.validate(reply["parsed"], SCHEMA)
    assert json.loads(reply["text"]) == reply["parsed"]
    reply = client.request(topic, {"id": "s2", "prompt": "a", "format": "json", "max_tokens": 300, "seed": 5})[-1]
    assert reply["type"] == "result" and isinstance(reply["parsed"], dict)
    reply = client.request(topic, {"id": "s3", "prompt": "a", "format": {"type": "number", "maximum": 3}})[-1]
    assert reply["type"] == "error" and reply["error"]["code"] == "bad_request"
    assert reply["error"]["param"] == "format.maximum"
    reply = client.request(topic, {"id": "s4", "prompt": "a", "format": "json", "max_tokens": 1})[-1]
    assert reply["type"] == "error" and reply["error"]["code"] == "truncated"
