"""Structured output through llama.cpp's grammar sampler, on the real appliance: the OpenAI client's
response_format in both shapes, a raw GBNF grammar, the MQTT fields (with the parsed result), and the refusals.

The tiny test model writes noise; under a grammar even noise must come out as JSON of the schema's shape, which is
what makes these tests able to fail (without the grammar the answers do not parse)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.support import tiny_models
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


@pytest.fixture(scope="module")
def catalog_path(models_dir, tmp_path_factory):
    """The shared tiny models plus tiny-newlines, which writes a newline wherever a grammar allows one."""
    d = tmp_path_factory.mktemp("structured-models")
    newlines = tiny_models.write_llama(d / "tiny-newlines.gguf", seed=5, chat_template=tiny_models.CHAT_TEMPLATE,
                                       favour="\n")
    shared = (models_dir / "catalog.toml").read_text().replace('file = "', f'file = "{models_dir}/')
    (d / "catalog.toml").write_text("\n".join([shared, tiny_models.catalog_entry("tiny-newlines", newlines)]))
    return d / "catalog.toml"


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


def test_strings_hold_no_raw_control_characters(appliance_factory):
    """JSON forbids a raw newline inside a string; llama-cpp-python's schema converter allowed one, and a model
    that wanted a newline there gave an answer that did not parse (a 422 for the user)."""
    app = appliance_factory(default="tiny-newlines", overrides={"models": {"switch": True}})
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 12}}, "required": ["note"]}
    client = openai.OpenAI(base_url=app.http_url + "/v1", api_key="unused", timeout=120)
    free = client.chat.completions.create(model="tiny-newlines", messages=CHAT, max_tokens=5, temperature=0)
    assert free.choices[0].message.content == "\n" * 5, "the model must want newlines for this test to mean much"
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny-newlines", messages=CHAT, max_tokens=80, seed=seed, temperature=0.8,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
