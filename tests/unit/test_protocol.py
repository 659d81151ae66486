"""Request validation shared by both transports."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance import protocol
from appliance.errors import BadRequest
from appliance.json_input import decode_json
from appliance.protocol import Message, parse_generate


def test_minimal_request_gets_an_id_and_defaults():
    request = parse_generate({"prompt": "hi"})
    assert isinstance(request.id, str) and len(request.id) == 32
    assert request.params.max_tokens is None and request.params.temperature is None and request.params.top_p is None
    assert request.stream is False and request.messages is None
    # unset: the configured and the model's defaults, else llama-cpp-python's 0.8 and 0.95
    resolved = request.params.with_defaults(max_tokens=256, temperature=None, top_p=0.9)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_p) == (256, 0.8, 0.9)
    own = parse_generate({"prompt": "hi", "temperature": 0, "max_tokens": 3}).params
    assert own.with_defaults(max_tokens=256, temperature=0.2, top_p=None) == replace(own, top_p=0.95)


def test_full_request():
    request = parse_generate({"id": 7, "model": "m", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 9, "temperature": 0, "top_p": 0.5, "top_k": 3, "repeat_penalty": 1.1,
                              "stop": "END", "seed": 42, "stream": True, "reply_to": "a/b"})
    assert request.id == 7 and request.messages == (Message("user", "x"),)
    assert request.params.stop == ("END",) and request.params.seed == 42 and request.params.temperature == 0.0
    assert request.reply_to == "a/b"


def test_openai_content_parts_are_joined():
    request = parse_generate({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}]})
    assert request.messages[0].content == "ab"


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "top_p": 2}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["a"] * 9}, "stop"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "id": ""}, "id"),
    ({"prompt": "a", "id": {"x": 1}}, "id"),
    ({"prompt": "a", "model": ""}, "model"),
    ({"prompt": "a", "reply_to": "a/#"}, "reply_to"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"prompt": "a", "temprature": 1}, "temprature"),
])
def test_invalid_requests_name_the_field(body, param):
    with pytest.raises(BadRequest) as err:
        parse_generate(body)
    assert err.value.param == param and err.value.message


def test_decode_json_errors_say_what_is_wrong():
    with pytest.raises(BadRequest, match="not valid JSON: Expecting"):
        decode_json(b'{"a":', limit=100)
    with pytest.raises(BadRequest, match="not UTF-8"):
        decode_json(b"\xff", limit=100)
    with pytest.raises(BadRequest, match="larger than the limit of 10"):
        decode_json(b"x" * 11, limit=10)


@pytest.mark.parametrize(("payload", "says"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels"),  # the C parser's RecursionError
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than 32 levels"),  # parses, but no request is that deep
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"temperature": NaN}', "NaN is not a number"),
    (b'{"temperature": -Infinity}', "-Infinity is not a number"),
    (b'{"temperature": 1e999}', "1e999 is too large"),
    (b'{"prompt": "a", "prompt": "b"}', "'prompt' appears twice"),
    (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
    (b'\xef\xbb\xbf{"prompt": "a"}', "not valid JSON"),  # a UTF-8 byte order mark
    (b'{"prompt": "a\xc3"}', "not UTF-8"),
])
def test_hostile_json_is_a_bad_request_naming_the_problem(payload, says):
    with pytest.raises(BadRequest, match=says) as err:
        decode_json(payload, limit=1 << 20)
    assert err.value.code == "bad_request"


def test_json_within_the_limits_decodes():
    assert decode_json(b"[" * 32 + b"]" * 32, limit=100) is not None
    assert decode_json('{"p": "\\ud83d\\ude00", "n": 1e300, "i": ' + "9" * 4000 + "}", limit=10_000)["p"] == "😀"


@pytest.mark.parametrize(("topic", "named"), [
    ("", "non-empty"), (None, "non-empty"), ("a/+/b", "wildcards"), ("a/#", "wildcards"), ("a\x00b", "U+0000"),
    ("a\x1fb", "U+001F"), ("a\x7fb", "U+007F"), ("a\x9fb", "U+009F"), ("a\ufdd0", "U+FDD0"), ("a\uffff", "U+FFFF"),
    ("a\U0001fffe", "U+1FFFE"), ("é" * 32_768, "65535 bytes")])
def test_reply_topics_mosquitto_would_refuse_are_named(topic, named):
    assert named in (protocol.reply_topic_problem(topic) or "")


@pytest.mark.parametrize("topic", ["replies/sensor1/x", "a", "é" * 32_767, "知/识", "$share-not/x", "a b/c"])
def test_ordinary_reply_topics_pass(topic):
    assert protocol.reply_topic_problem(topic) is None
