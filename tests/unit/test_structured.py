"""Which JSON schemas the grammar can enforce (appliance/structured.py) and how each transport's fields map onto
structured output. The grammar itself is exercised against llama.cpp in tests/integration/test_structured.py."""

from __future__ import annotations

import pytest

from appliance.errors import BadRequest, Truncated
from appliance.protocol import Completion, Usage, parse_generate, result_payload
from appliance.structured import check_complete, check_schema, from_grammar, json_mode, strict_json_strings
from appliance.transports import ollama, openai


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "integer", "minimum": 0}, "minimum"),                      # one-sided: unbounded enum
    ({"type": "integer", "minimum": 0, "maximum": 10**6}, "maximum"),    # too many values to list
    ({"type": "number", "minimum": 0, "maximum": 1}, "minimum"),         # the converter ignores number bounds
    ({"type": "array", "minItems": 2}, "minItems"),                      # bounds without items are dropped
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),  # pattern wins, length dropped
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "string", "format": "date", "maxLength": 4}, "maxLength"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"allOf": [{"type": "object"}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {}, "minProperties": 1}, "minProperties"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}}, "maxLength"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "object", "properties": {"deep": {"type": "object", "properties": {
        "x": {"type": "string", "format": "uri"}}}}}, "format"),
])
def test_unenforceable_keywords_are_refused_by_name(schema, keyword):
    with pytest.raises(BadRequest) as error:
        check_schema(schema)
    assert f"'{keyword}'" in error.value.message and error.value.param.endswith(keyword)


def test_refusal_says_where_in_the_schema():
    with pytest.raises(BadRequest) as error:
        check_schema({"type": "object", "properties": {"a": {"type": "array", "items": {
            "type": "string", "format": "email"}}}}, "format")
    assert error.value.param == "format.properties.a.items.format"
    assert "'properties.a.items'" in error.value.message


def test_bounded_integer_ranges_become_enums():
    checked = check_schema({"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 1, "maximum": 4, "description": "kept"},
        "b": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
        "c": {"type": "integer", "minimum": 0.5, "maximum": 2.5}}, "required": ["a"]})
    props = checked["properties"]
    assert props["a"] == {"type": "integer", "enum": [1, 2, 3, 4], "description": "kept"}
    assert props["b"]["enum"] == [1, 2] and props["c"]["enum"] == [1, 2]
    with pytest.raises(BadRequest, match="empty"):
        check_schema({"type": "integer", "minimum": 5, "maximum": 4})


def test_enforceable_schemas_pass_unchanged():
    schema = {"type": "object", "title": "t", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[a-z]{3}$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "ref": {"$ref": "#/$defs/thing"}, "kind": {"const": "x"}, "any": {"type": ["string", "null"]}},
        "required": ["name"], "additionalProperties": False, "$defs": {"thing": {"type": "boolean"}}}
    assert check_schema(schema) == schema


def test_grammar_needs_a_root_rule():
    assert from_grammar('root ::= "yes" | "no"', "grammar").grammar == 'root ::= "yes" | "no"'
    for bad in ("yes", 'answer ::= "yes"', 42):
        with pytest.raises(BadRequest):
            from_grammar(bad, "grammar")


def _completion(text: str, finish_reason: str = "stop") -> Completion:
    return Completion(text, finish_reason, Usage(3, 5), 1.0, 10.0, "m")


def test_cut_answers_are_truncated_not_invalid_json():
    check_complete(json_mode(), _completion('{"a": 1}'))
    with pytest.raises(Truncated) as error:
        check_complete(json_mode(), _completion('{"a": ', "length"))
    assert error.value.code == "truncated" and error.value.param == "max_tokens"
    with pytest.raises(Truncated) as error:
        check_complete(json_mode(), _completion('{"a": '))  # cut by a stop sequence
    assert error.value.param == "stop"
    check_complete(from_grammar('root ::= "y"', "grammar"), _completion("y"))


def test_mqtt_fields_and_parsed_result():
    request = parse_generate({"prompt": "p", "json_schema": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 2}}}})
    assert request.structured is not None and request.structured.kind == "json_schema"
    assert '"enum":[0,1,2]' in (request.structured.schema or "")
    assert parse_generate({"prompt": "p", "format": "json"}).structured == json_mode()
    payload = result_payload("r", _completion('{"n": 1}'), request.structured)
    assert payload["parsed"] == {"n": 1}
    assert "parsed" not in result_payload("r", _completion("x"))
    with pytest.raises(BadRequest) as error:
        parse_generate({"prompt": "p", "format": "json", "grammar": 'root ::= "a"'})
    assert error.value.param == "grammar"
    with pytest.raises(BadRequest) as error:
        parse_generate({"prompt": "p", "format": "yaml"})
    assert error.value.param == "format"


def test_openai_response_format_shapes():
    chat = [{"role": "user", "content": "hi"}]
    assert openai.chat_request({"messages": chat, "response_format": {"type": "text"}}).structured is None
    assert openai.chat_request({"messages": chat,
                                "response_format": {"type": "json_object"}}).structured == json_mode()
    request = openai.chat_request({"messages": chat, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "boolean"}}}})
    assert request.structured is not None and request.structured.schema == '{"type":"boolean"}'
    assert openai.completion_request({"prompt": "a", "grammar": 'root ::= "a"'}).structured is not None
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(BadRequest) as error:
            openai.chat_request({"messages": chat, "response_format": bad})
        assert error.value.param.startswith("response_format")


def test_ollama_format_and_refusals():
    request = ollama.chat_request({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}],
                                   "format": {"type": "object", "properties": {"a": {"type": "boolean"}}},
                                   "options": {"num_predict": 9, "num_ctx": 4096, "temperature": 0},
                                   "keep_alive": "5m"})
    assert request.model == "m" and request.stream and request.params.max_tokens == 9
    assert request.structured is not None and request.structured.kind == "json_schema"
    generate = ollama.generate_request({"model": "m", "prompt": "hi", "system": "be brief", "stream": False})
    assert generate is not None and not generate.stream and generate.messages is not None
    assert [m.role for m in generate.messages] == ["system", "user"]
    assert ollama.generate_request({"model": "m"}) is None  # "load the model"
    for body, param in (({"model": "m", "prompt": "a", "options": {"mirostat": 1}}, "options.mirostat"),
                        ({"model": "m", "prompt": "a", "images": ["x"]}, "images"),
                        ({"model": "m", "prompt": "a", "format": {"type": "integer", "minimum": 1}},
                         "format.minimum"),
                        ({"model": "m", "prompt": "a", "raw": True, "system": "s"}, "system"),
                        ({"model": "m", "prompt": "a", "typo": 1}, "typo")):
        with pytest.raises(BadRequest) as error:
            ollama.generate_request(body)
        assert error.value.param == param


def test_converted_strings_refuse_control_characters():
    # the rule as llama-cpp-python 0.3.36's json_schema_to_gbnf writes it: any character but '"' and '\\'
    lax = (r'char ::= [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])' "\n"
           r'root ::= "\"" char* "\"" space' "\n" r'space ::= " "?')
    strict = strict_json_strings(lax)
    assert strict.splitlines()[0].startswith(r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (')
    assert strict.splitlines()[1:] == lax.splitlines()[1:]
    assert strict_json_strings(strict) == strict
