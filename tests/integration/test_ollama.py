"""The Ollama-compatible routes, driven by the real ``ollama`` Python client (0.6.3, the one Home Assistant pins)
against the running appliance."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import pytest

from tests.support.harness import http_get, http_post

ollama = pytest.importorskip("ollama")


@pytest.fixture
def client(appliance):
    return ollama.Client(host=appliance.http_url, timeout=120)


def test_list_show_ps_version(appliance, client):
    listed = client.list()
    names = [m.model for m in listed.models]
    assert "tiny:latest" in names and all(n.endswith(":latest") for n in names)
    entry = listed.models[names.index("tiny:latest")]
    assert entry.size > 0 and len(entry.digest) == 64 and entry.details.format == "gguf"
    assert entry.details.quantization_level == "Q4_0"
    raw = json.loads(http_get(appliance.http_url + "/api/tags")[1])
    assert all(m["name"] == m["model"] for m in raw["models"])

    shown = client.show("tiny")
    assert shown.modelinfo is not None and shown.details.family
    assert client.show("tiny:latest").details == shown.details

    running = client.ps()
    assert [m.model for m in running.models] == ["tiny:latest"]
    assert isinstance(running.models[0].expires_at, datetime)

    status, body = http_get(appliance.http_url + "/api/version")
    assert status == 200 and json.loads(body)["version"] == "0.6.3"


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "hello"}]
    options = {"temperature": 0, "num_predict": 8, "num_ctx": 2048}
    whole = client.chat(model="tiny", messages=messages, options=options, stream=False, keep_alive="5m")
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 8 and whole.prompt_eval_count > 0 and whole.total_duration > 0
    assert datetime.fromisoformat(whole.created_at.replace("Z", "+00:00"))

    parts = list(client.chat(model="tiny:latest", messages=messages, options=options, stream=True))
    assert all(p.message.role == "assistant" for p in parts)
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 8
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_generate_streamed_and_not(client):
    options = {"temperature": 0, "num_predict": 6, "seed": 3}
    whole = client.generate(model="tiny", prompt="the cat", options=options)
    assert whole.done and whole.response and whole.eval_count == 6
    parts = list(client.generate(model="tiny", prompt="the cat", options=options, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].done_reason == "length"
    raw = client.generate(model="tiny", prompt="the cat", raw=True, options=options)
    assert raw.eval_count == 6
    loaded = client.generate(model="tiny")  # no prompt: Ollama's way of loading a model
    assert loaded.done and loaded.done_reason == "load"


def test_refusals_name_the_field(client):
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="gpt-oss", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404 and "gpt-oss" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi", "images": ["aGk="]}], stream=False)
    assert error.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="tiny", prompt="hi", options={"mirostat": 2})
    assert error.value.status_code == 400 and "mirostat" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="tiny", prompt="hi", think=True)
    assert error.value.status_code == 400 and "think" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=False,
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert error.value.status_code == 400 and "tools" in error.value.error


def test_same_api_key_rule(appliance_factory, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-s3cret-s3cret\n")
    app = appliance_factory(overrides={"http": {"api_key_file": str(key_file)}}, start=False)
    app.start(wait=False)
    app.readyz_until("ready", headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})
    for call in (lambda c: c.list(), lambda c: c.ps(), lambda c: c.show("tiny"),
                 lambda c: c.generate(model="tiny", prompt="a", options={"num_predict": 2})):
        with pytest.raises(ollama.ResponseError) as error:
            call(ollama.Client(host=app.http_url))
        assert error.value.status_code == 401
    keyed = ollama.Client(host=app.http_url, headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})
    assert keyed.generate(model="tiny", prompt="a", options={"num_predict": 2}).eval_count == 2
    assert http_get(app.http_url + "/api/version")[0] == 401


def test_listing_answers_while_generating(appliance_factory):
    """Home Assistant polls /api/tags and /api/ps while a conversation is generated: they must not wait for it."""
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "request_timeout": 600}})
    client = ollama.Client(host=app.http_url, timeout=120)
    done = threading.Event()

    def generate() -> None:
        client.generate(model="slow", prompt="a", options={"num_predict": 2000, "temperature": 0})
        done.set()

    worker = threading.Thread(target=generate)
    worker.start()
    app.wait_status(lambda s: s["outstanding"] >= 1)
    waits = []
    for _ in range(3):
        started = time.monotonic()
        assert client.list().models and client.ps().models
        waits.append(time.monotonic() - started)
    assert not done.is_set(), "the generation must still be running while the listings were answered"
    assert max(waits) < 1.0, waits
    worker.join(timeout=300)


def test_json_mode_and_schema(client, appliance):
    """The tiny model writes noise; under the grammar even noise is valid JSON of the schema's shape."""
    answer = client.generate(model="tiny", prompt="a", format="json", options={"num_predict": 200, "seed": 1},
                             stream=False)
    if answer.done_reason == "length":
        pytest.fail("a JSON answer cut by num_predict must be an error, not a 'length' answer")
    assert isinstance(json.loads(answer.response), dict)
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]},
                                               "level": {"type": "integer", "minimum": 1, "maximum": 5},
                                               "ok": {"type": "boolean"}},
              "required": ["mood", "level", "ok"]}
    for seed in range(5):
        reply = client.chat(model="tiny", messages=[{"role": "user", "content": "how are you?"}], format=schema,
                            options={"num_predict": 100, "seed": seed, "temperature": 1.0})
        value = json.loads(reply.message.content)
        assert value["mood"] in ("happy", "sad") and 1 <= value["level"] <= 5 and isinstance(value["ok"], bool)
    status, body = http_post(appliance.http_url + "/api/chat", {
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False,
        "format": {"type": "integer", "minimum": 0}})
    assert status == 400 and "minimum" in body["error"]
