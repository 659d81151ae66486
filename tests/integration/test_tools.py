"""Tool calls on the real appliance, driven by the real ``openai`` and ``ollama`` clients: a tiny GGUF whose own chat
template is Qwen2.5's shape (tools listed, ``<tool_call>`` blocks), the refusals on models without tool support,
and a second turn carrying the tool's result.

The tiny model writes noise: only the grammar built from each tool's ``parameters`` makes its calls valid, so every
call's arguments are checked with ``jsonschema`` against the tool's schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.support import tiny_models
from tests.support.harness import http_post

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Oslo", "Lima", "Kyoto"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "metric": {"type": "boolean"}},
    "required": ["city", "days", "metric"]}
LIGHT = {"type": "object", "properties": {"room": {"enum": ["hall", "kitchen"]}, "on": {"type": "boolean"}},
         "required": ["room", "on"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_light", "description": "Switch a light",
                                           "parameters": LIGHT}}]
SCHEMAS = {"get_weather": WEATHER, "set_light": LIGHT}
CHAT = [{"role": "user", "content": "What is the weather in Oslo?"}]
SETTINGS = {"models": {"switch": True}, "worker": {"context_size": 2048}}


@pytest.fixture(scope="module")
def catalog_path(models_dir, tmp_path_factory):
    """The shared tiny models plus two whose GGUF embeds a template that supports tools: tiny-tools, and
    tiny-tools-eager, which picks "<" wherever the grammar allows it, so that with "auto" it always calls."""
    d = tmp_path_factory.mktemp("tools-models")
    model = tiny_models.write_llama(d / "tiny-tools.gguf", seed=3, context=2048,
                                    chat_template=tiny_models.TOOLS_TEMPLATE)
    eager = tiny_models.write_llama(d / "tiny-tools-eager.gguf", seed=4, context=2048,
                                    chat_template=tiny_models.TOOLS_TEMPLATE, favour="<")
    shared = (models_dir / "catalog.toml").read_text().replace('file = "', f'file = "{models_dir}/')
    (d / "catalog.toml").write_text("\n".join([shared, tiny_models.catalog_entry("tiny-tools", model),
                                               tiny_models.catalog_entry("tiny-tools-eager", eager)]))
    return d / "catalog.toml"


@pytest.fixture
def appliance(appliance_factory):
    return appliance_factory(default="tiny-tools", overrides=SETTINGS)


@pytest.fixture
def client(appliance):
    return openai.OpenAI(base_url=appliance.http_url + "/v1", api_key="unused", timeout=120)


def _valid(name: str, arguments: object) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(arguments, SCHEMAS[name])


def test_required_calls_validate(client):
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny-tools", messages=CHAT, tools=TOOLS,
                                               tool_choice="required", max_tokens=200, seed=seed, temperature=1.0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        _valid(call.function.name, json.loads(call.function.arguments))


def test_named_function_streamed_and_second_turn(client):
    choice = {"type": "function", "function": {"name": "set_light"}}
    stream = client.chat.completions.create(model="tiny-tools", messages=CHAT, tools=TOOLS, tool_choice=choice,
                                            max_tokens=200, seed=7, stream=True)
    chunks = [c for c in stream if c.choices]
    assert all(not c.choices[0].delta.content for c in chunks), "a call is never streamed as content"
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "set_light"
    arguments = json.loads(calls[0].function.arguments)
    _valid("set_light", arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the client sends the call and its result back; the template renders both into the prompt
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "set_light",
                                                             "arguments": calls[0].function.arguments}}]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": "the hall light is on"}]
    first = client.chat.completions.create(model="tiny-tools", messages=CHAT, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, seed=1)
    second = client.chat.completions.create(model="tiny-tools", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=4, seed=1)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20, "the call and result reach the prompt"


def _auto(client, model: str, seed: int, stream: bool) -> tuple[str, list]:
    """The text and the calls of an "auto" answer (tool_choice left out, as the OpenAI client does by default)."""
    if stream:
        parts = [p for p in client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, max_tokens=200,
                                                             seed=seed, stream=True) if p.choices]
        text = "".join(p.choices[0].delta.content or "" for p in parts)
        calls = [tc for p in parts for tc in (p.choices[0].delta.tool_calls or [])]
        assert parts[-1].choices[0].finish_reason == ("tool_calls" if calls else "length")
        return text, calls
    choice = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, max_tokens=200,
                                            seed=seed).choices[0]
    assert choice.finish_reason == ("tool_calls" if choice.message.tool_calls else "length")
    return choice.message.content or "", choice.message.tool_calls or []


def test_auto_answers_text_or_a_call(client):
    for seed in range(2):
        for stream in (False, True):
            text, calls = _auto(client, "tiny-tools", seed, stream)  # this model's noise never opens with "<"
            assert text and not calls and not text.startswith("<")
            text, calls = _auto(client, "tiny-tools-eager", seed, stream)  # this one always does
            assert not text and len(calls) == 1
            _valid(calls[0].function.name, json.loads(calls[0].function.arguments))


def test_ollama_client_streamed_and_not(appliance):
    client = ollama.Client(host=appliance.http_url, timeout=120)
    options = {"seed": 5, "num_predict": 200}
    whole = client.chat(model="tiny-tools-eager", messages=CHAT, tools=TOOLS, stream=False, options=options)
    assert whole.done and whole.message.content == "" and len(whole.message.tool_calls or []) == 1
    call = whole.message.tool_calls[0]
    _valid(call.function.name, dict(call.function.arguments))

    parts = list(client.chat(model="tiny-tools-eager", messages=CHAT, tools=TOOLS, stream=True, options=options))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert all(p.message.role == "assistant" and not p.message.content for p in parts)
    streamed = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [
        (call.function.name, dict(call.function.arguments))], "the same seed gives the same call"

    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": call.function.name, "arguments": dict(call.function.arguments)}}]},
               {"role": "tool", "content": "done", "tool_name": call.function.name}]
    answer = client.chat(model="tiny-tools", messages=history, tools=TOOLS, stream=False,
                         options={"num_predict": 3, "seed": 1})
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    assert answer.prompt_eval_count > whole.prompt_eval_count, "the call and its result reach the prompt"

    text = client.chat(model="tiny-tools", messages=CHAT, tools=TOOLS, stream=False, options=options)
    assert text.message.content and not text.message.tool_calls


def test_mqtt_tools(appliance, mqtt_client):
    client = mqtt_client()
    reply = client.request(appliance.topic("generate"), {"id": "t1", "messages": CHAT, "tools": TOOLS,
                                                         "tool_choice": "required", "max_tokens": 200, "seed": 2})[-1]
    assert reply["type"] == "result" and reply["finish_reason"] == "tool_calls", reply
    call = reply["tool_calls"][0]["function"]
    _valid(call["name"], json.loads(call["arguments"]))


def test_refusals(client, appliance):
    url = appliance.http_url + "/v1/chat/completions"
    for model in ("tiny", "tiny-chat"):  # a named prompt format; an embedded template without tools
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, max_tokens=5)
        assert "tools" in str(error.value) and error.value.body["param"] == "tools"
    unique = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny-tools", messages=CHAT, tool_choice="required", tools=[
            {"type": "function", "function": {"name": "tag", "parameters": unique}}])
    assert "uniqueItems" in str(error.value)
    assert error.value.body["param"] == "tools[0].function.parameters.properties.tags.uniqueItems"
    status, body = http_post(url, {"messages": CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "missing"}}})
    assert status == 400 and body["error"]["param"] == "tool_choice"
    status, body = http_post(url, {"messages": CHAT, "tools": TOOLS, "response_format": {"type": "json_object"}})
    assert status == 400 and body["error"]["param"] == "tools"
    status, body = http_post(url, {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "max_tokens": 3})
    assert status == 422 and body["error"]["code"] == "truncated"
    status, body = http_post(appliance.http_url + "/api/chat", {"model": "tiny-chat", "messages": CHAT,
                                                                "tools": TOOLS, "stream": False})
    assert status == 400 and "tools" in body["error"] and body["param"] == "tools"


def test_default_model_refuses_tools(default_app):
    """SmolLM2's own template has no tool support: refused, naming tools."""
    status, body = http_post(default_app.http_url + "/v1/chat/completions",
                             {"messages": CHAT, "tools": TOOLS, "max_tokens": 5})
    assert status == 400 and body["error"]["param"] == "tools", body
    assert "does not render tools" in body["error"]["message"]


def test_batched_calls_structured_answers_and_text_each_keep_their_grammar(appliance_factory):
    """With worker.parallel = 4 the four requests decode in one batch, each under its own grammar (or none)."""
    from concurrent.futures import ThreadPoolExecutor

    app = appliance_factory(default="tiny-tools", overrides={**SETTINGS, "worker": {"context_size": 2048,
                                                                                    "parallel": 4}})
    batched = openai.OpenAI(base_url=app.http_url + "/v1", api_key="unused", timeout=120)

    def call(seed: int):
        return batched.chat.completions.create(model="tiny-tools", messages=CHAT, tools=TOOLS,
                                               tool_choice="required", max_tokens=200, seed=seed, temperature=1.0)

    def structured():
        return batched.chat.completions.create(
            model="tiny-tools", messages=CHAT, max_tokens=300, seed=5,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})

    def text():
        return batched.chat.completions.create(model="tiny-tools", messages=CHAT, max_tokens=40, seed=6)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, 1), pool.submit(call, 2), pool.submit(structured), pool.submit(text)]
        first, second, answer, plain = (f.result() for f in futures)
    for reply in (first, second):
        (tool_call,) = reply.choices[0].message.tool_calls
        _valid(tool_call.function.name, json.loads(tool_call.function.arguments))
    jsonschema.validate(json.loads(answer.choices[0].message.content), WEATHER)
    assert plain.choices[0].message.content and plain.choices[0].message.tool_calls is None
    assert app.status()["state"] == "ready"
