"""Tool calls (appliance/tools.py): validating ``tools`` and ``tool_choice``, the grammar of a call, reading calls
back out of an answer, streaming them, and each transport's answer shape. The grammar runs against llama.cpp in
tests/integration/test_tools.py."""

from __future__ import annotations

import json

import pytest

from appliance.errors import BadRequest, Truncated
from appliance.protocol import Completion, Usage, parse_generate, result_payload
from appliance.tools import CallDetector, check_complete, grammar, parse_calls, parse_tools, template_supports
from appliance.transports import ollama, openai

LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
TOOLS = [{"type": "function", "function": {"name": "light", "parameters": LIGHT}},
         {"type": "function", "function": {"name": "time", "description": "the time"}}]
CALL = '<tool_call>\n{"name": "light", "arguments": {"on": true}}\n</tool_call>'
CHAT = [{"role": "user", "content": "hi"}]


def _completion(text: str, finish: str = "stop") -> Completion:
    return Completion(text, finish, Usage(5, 9), 1.0, 10.0, "m")


def _fake_gbnf(schema: str) -> str:
    # stands in for llama-cpp-python's converter: a root rule plus the sub-rules it names root-0, root-1 ...
    return f"root ::= root-0\nroot-0 ::= {json.dumps(schema)}\n"


def test_template_detection():
    assert template_supports("{% if tools %}{{ tools | tojson }}{% endif %}<tool_call>")
    assert not template_supports("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}")  # SmolLM2's kind
    assert not template_supports("{% if tools %}[TOOL_CALLS]{% endif %}")  # another call format: not parsed here
    assert not template_supports(None)


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ({"type": "function"}, None, "tools"),
    ([{"type": "retrieval"}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "a", "strictly": True}}], None, "tools[0].function.strictly"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "string"}}}}}],
     None, "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "minimum": 0}}}}}], None,
     "tools[0].function.parameters.properties.n.minimum"),
    (TOOLS + TOOLS[:1], None, "tools"),
    (TOOLS, "always", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_refused(tools, choice, param):
    with pytest.raises(BadRequest) as error:
        parse_tools(tools, choice)
    assert error.value.param == param


def test_choices():
    assert parse_tools(None, None) is None and parse_tools([], "auto") is None
    use = parse_tools(TOOLS, None)
    assert use is not None and use.choice == "auto" and use.calls and not use.forced
    assert json.loads(use.tools[1].parameters) == {"type": "object", "properties": {}}
    assert use.definitions() == TOOLS  # what the template renders: the tools as sent
    named = parse_tools(TOOLS, {"type": "function", "function": {"name": "time"}})
    assert named is not None and named.forced and named.function == "time"
    none = parse_tools(TOOLS, "none")
    assert none is not None and not none.calls and grammar(none, _fake_gbnf) is None


def test_grammar_shapes():
    schemas: list[dict] = []

    def converter(schema: str) -> str:
        schemas.append(json.loads(schema))
        return _fake_gbnf(schema)

    forced = grammar(parse_tools(TOOLS, "required"), converter) or ""
    assert "tool-call-json ::= root-0" in forced and "root ::= tool-call\n" in forced
    assert '"<tool_call>\\n" tool-call-json "\\n</tool_call>"' in forced
    # both tools offered: one of two call objects, the name first, the arguments under the tool's own schema
    assert [b["properties"]["name"] for b in schemas[0]["anyOf"]] == [{"const": "light"}, {"const": "time"}]
    assert schemas[0]["anyOf"][0]["properties"]["arguments"] == LIGHT
    assert schemas[0]["anyOf"][0]["required"] == ["name", "arguments"]
    grammar(parse_tools(TOOLS, {"type": "function", "function": {"name": "time"}}), converter)
    assert schemas[1]["properties"]["name"] == {"const": "time"}
    auto = grammar(parse_tools(TOOLS, "auto"), _fake_gbnf) or ""
    assert "root ::= tool-call | prose" in auto and "prose ::= [^<]" in auto


def test_parse_calls():
    use = parse_tools(TOOLS, None)
    calls = parse_calls(use, CALL)
    assert [(c.name, c.arguments_object()) for c in calls] == [("light", {"on": True})]
    assert calls[0].id.startswith("call_")
    assert parse_calls(use, "plain text") == ()
    assert parse_calls(use, " " + CALL) == ()  # only a call opened at the first character was under the grammar
    assert parse_calls(use, CALL.replace("light", "other")) == ()  # not an offered tool: left as text
    assert parse_calls(parse_tools(TOOLS, "none"), CALL) == ()
    assert parse_calls(None, CALL) == ()


def test_cut_call_is_truncated():
    use = parse_tools(TOOLS, "required")
    assert use is not None
    with pytest.raises(Truncated):
        check_complete(use, _completion(CALL[:20], "length"))
    auto = parse_tools(TOOLS, None)
    assert auto is not None
    check_complete(auto, _completion("some text", "length"))  # a text answer may be cut as any other
    with pytest.raises(Truncated):
        check_complete(auto, _completion(CALL[:20], "length"))


def test_detector_holds_back_a_possible_call():
    detector = CallDetector(parse_tools(TOOLS, None))
    assert [detector.push(p) for p in ("<tool", "_call>\n", '{"name"')] == ["", "", ""]
    calls, rest = detector.finish(CALL)
    assert len(calls) == 1 and rest == ""
    text = CallDetector(parse_tools(TOOLS, None))
    assert [text.push(p) for p in ("<to", "ad", " here")] == ["", "<toad", " here"]
    assert text.finish("<toad here") == ((), "")
    held = CallDetector(parse_tools(TOOLS, None))
    assert held.push("<") == "" and held.finish("<") == ((), "<")  # an answer of just "<" is still sent


def test_messages_with_calls_and_results():
    request = parse_generate({"messages": [
        *CHAT, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "light", "arguments": '{"on": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "light", "arguments": {}}}]},
        {"role": "tool", "tool_name": "light", "content": "ok"}], "tools": TOOLS})
    messages = request.messages or ()
    assert request.uses_tools and messages[1].tool_calls[0].arguments_object() == {"on": True}
    assert messages[2].tool_call_id == "call_1" and messages[4].name == "light"
    assert messages[3].tool_calls[0].id.startswith("call_")  # Ollama sends no id
    with pytest.raises(BadRequest) as error:
        parse_generate({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "light", "arguments": "{not json"}}]}]})
    assert error.value.param == "messages[0].tool_calls[0].function.arguments"
    with pytest.raises(BadRequest) as error:
        parse_generate({"prompt": "hi", "tools": TOOLS})
    assert error.value.param == "tools"
    with pytest.raises(BadRequest) as error:
        parse_generate({"messages": CHAT, "tools": TOOLS, "format": "json"})
    assert error.value.param == "tools"
    assert parse_generate({"messages": CHAT, "tools": TOOLS, "tool_choice": "none", "format": "json"}).structured


def test_openai_shapes():
    request = openai.chat_request({"messages": CHAT, "tools": TOOLS, "tool_choice": "required",
                                   "parallel_tool_calls": False})
    full = openai.ResponseShaper(request, "m", "chat").full(_completion(CALL))
    message = full["choices"][0]["message"]
    assert full["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["type"] == "function"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"on": True}
    shaper = openai.ResponseShaper(request, "m", "chat")
    assert shaper.delta_chunk(CALL[:5]) is None
    final = shaper.final_chunks(_completion(CALL), include_usage=False)
    assert final[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert final[-1]["choices"][0]["finish_reason"] == "tool_calls"
    with pytest.raises(BadRequest) as error:
        openai.chat_request({"messages": CHAT, "functions": [{"name": "f"}]})
    assert error.value.param == "functions"


def test_ollama_shapes():
    request = ollama.chat_request({"model": "m", "messages": CHAT, "tools": TOOLS, "stream": False})
    assert request.tools is not None and request.tools.choice == "auto"
    shaper = ollama.ResponseShaper("m", "chat", request.tools)
    whole = shaper.final(_completion(CALL), streamed=False)
    assert whole["message"] == {"role": "assistant", "content": "",
                                "tool_calls": [{"function": {"name": "light", "arguments": {"on": True}}}]}
    shaper = ollama.ResponseShaper("m", "chat", request.tools)
    assert shaper.delta(CALL) is None
    lines = shaper.final_lines(_completion(CALL))
    assert [line["done"] for line in lines] == [False, True] and "tool_calls" in lines[0]["message"]
    with pytest.raises(BadRequest) as error:
        ollama.generate_request({"model": "m", "prompt": "hi", "tools": TOOLS})
    assert error.value.param == "tools"


def test_mqtt_result_carries_the_calls():
    use = parse_tools(TOOLS, "required")
    payload = result_payload("r1", _completion(CALL), None, use)
    assert payload["finish_reason"] == "tool_calls"
    assert payload["tool_calls"][0]["function"]["name"] == "light" and payload["text"] == CALL
    assert "tool_calls" not in result_payload("r2", _completion("text"), None, use)
