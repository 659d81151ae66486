"""Structured output: which JSON schemas a grammar can enforce, refused by keyword when it cannot.

Constrained generation turns a JSON schema into a llama.cpp grammar (llama-cpp-python's ``json_schema_to_gbnf``,
inside the worker). That converter enforces only one group of keywords per schema node and silently ignores the
rest (``minimum`` on integers, ``minItems`` without ``items``, ``minLength`` beside a ``pattern``, ``uniqueItems``,
``not`` ...): an answer would then "follow the schema" without satisfying it. :func:`check_schema` walks the schema
first and refuses, with ``bad_request`` naming the keyword and where it is, anything the grammar would drop.

Integer bounds are the one gap closed here rather than refused: a range of at most :data:`MAX_INTEGER_CHOICES`
values becomes an ``enum`` of those integers, which the grammar does enforce.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.errors import BadRequest, Truncated

if TYPE_CHECKING:
    from appliance.protocol import Completion

MAX_INTEGER_CHOICES = 1024
MAX_SCHEMA_DEPTH = 32
#: keywords that describe and constrain nothing; allowed anywhere
ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples", "$defs",
                         "definitions", "readOnly", "writeOnly", "deprecated"})
TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
KINDS = ("json", "json_schema", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What shape a generated answer must have: any JSON object ("json"), a JSON schema ("json_schema", kept as
    compact JSON text, already checked) or a raw GBNF grammar ("grammar")."""

    kind: str
    schema: str | None = None
    grammar: str | None = None

    @property
    def is_json(self) -> bool:
        return self.kind != "grammar"


def json_mode() -> StructuredOutput:
    return StructuredOutput("json")


def from_schema(schema: object, param: str) -> StructuredOutput:
    checked = check_schema(schema, param)
    return StructuredOutput("json_schema", schema=json.dumps(checked, ensure_ascii=False, separators=(",", ":")))


def from_grammar(grammar: object, param: str) -> StructuredOutput:
    if not isinstance(grammar, str) or "::=" not in grammar:
        raise BadRequest(f"'{param}' must be a GBNF grammar (text with 'root ::= ...')", param=param)
    if not any(line.split("::=")[0].strip() == "root" for line in grammar.splitlines() if "::=" in line):
        raise BadRequest(f"'{param}' must define the rule 'root'", param=param)
    return StructuredOutput("grammar", grammar=grammar)


def check_schema(schema: object, param: str = "json_schema") -> dict[str, Any]:
    """The schema as the grammar converter should see it (integer ranges rewritten as enums), or BadRequest naming
    the first keyword the grammar could not enforce."""
    if not isinstance(schema, dict):
        raise BadRequest(f"'{param}' must be a JSON schema object", param=param)
    checked: dict[str, Any] = _Checker(schema, param).node(schema, "", 0)
    return checked


class _Checker:
    def __init__(self, root: dict[str, Any], param: str) -> None:
        self.root, self.param = root, param

    def refuse(self, where: str, keyword: str, why: str) -> BadRequest:
        place = f" at '{where}'" if where else ""
        return BadRequest(f"JSON schema keyword '{keyword}'{place} cannot be enforced: {why}",
                          param=f"{self.param}{'.' + where if where else ''}.{keyword}")

    def only(self, node: dict[str, Any], where: str, allowed: set[str], why: str) -> None:
        for keyword in node:
            if keyword not in allowed and keyword not in ANNOTATIONS:
                raise self.refuse(where, keyword, why)

    def node(self, node: object, where: str, depth: int) -> Any:
        if node is True:
            return {}
        if not isinstance(node, dict):
            raise BadRequest(f"'{self.param}{'.' + where if where else ''}' must be a schema object",
                             param=self.param)
        if depth > MAX_SCHEMA_DEPTH:
            raise self.refuse(where, "properties", f"schemas nested deeper than {MAX_SCHEMA_DEPTH} are refused")
        out = dict(node)
        for key in ("$defs", "definitions"):
            if key in node:
                defs = node[key]
                if not isinstance(defs, dict):
                    raise self.refuse(where, key, "it must be an object of schemas")
                out[key] = {k: self.node(v, f"{where}.{key}.{k}".lstrip("."), depth + 1) for k, v in defs.items()}
        kind = node.get("type")
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                raise self.refuse(where, "$ref", "only local references ('#/...') are supported")
            self.only(node, where, {"$ref"}, "beside '$ref' other keywords are ignored by the grammar")
            return out
        if "oneOf" in node:
            raise self.refuse(where, "oneOf", "the grammar cannot exclude values that match several branches; "
                                              "use 'anyOf'")
        for keyword in ("allOf", "not", "if", "then", "else", "uniqueItems", "contains", "patternProperties",
                        "dependentRequired", "dependentSchemas", "propertyNames", "multipleOf",
                        "minProperties", "maxProperties", "unevaluatedProperties", "unevaluatedItems"):
            if keyword in node:
                raise self.refuse(where, keyword, "the grammar converter does not support it")
        if "anyOf" in node:
            branches = node["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise self.refuse(where, "anyOf", "it must be a non-empty list of schemas")
            self.only(node, where, {"anyOf"}, "beside 'anyOf' other keywords are ignored by the grammar")
            out["anyOf"] = [self.node(b, f"{where}.anyOf[{i}]".lstrip("."), depth + 1) for i, b in enumerate(branches)]
            return out
        if isinstance(kind, list):
            if not kind or any(t not in TYPES for t in kind):
                raise self.refuse(where, "type", f"each type must be one of {', '.join(TYPES)}")
            self.only(node, where, {"type"}, "a list of types admits no further constraints in the grammar")
            return out
        if kind is not None and kind not in TYPES:
            raise self.refuse(where, "type", f"'{kind}' is not a JSON type ({', '.join(TYPES)})")
        if "const" in node:
            self.only(node, where, {"const", "type"}, "beside 'const' other keywords are ignored by the grammar")
            return out
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise self.refuse(where, "enum", "it must be a non-empty list")
            self.only(node, where, {"enum", "type"}, "beside 'enum' other keywords are ignored by the grammar")
            return out
        if kind in (None, "object") and ("properties" in node or "additionalProperties" in node):
            return self.object(node, out, where, depth)
        if kind in (None, "array") and ("items" in node or "prefixItems" in node):
            return self.array(node, out, where, depth)
        if kind == "integer" and any(k in node for k in ("minimum", "maximum", "exclusiveMinimum",
                                                          "exclusiveMaximum")):
            return self.integer_range(node, where)
        if kind in (None, "string") and "pattern" in node:
            if not isinstance(node["pattern"], str):
                raise self.refuse(where, "pattern", "it must be a string")
            self.only(node, where, {"type", "pattern"}, "beside 'pattern' other keywords are ignored by the grammar")
            return out
        if "format" in node:
            if kind not in (None, "string") or node["format"] not in FORMATS:
                raise self.refuse(where, "format", f"only the string formats {', '.join(FORMATS)} are supported")
            self.only(node, where, {"type", "format"}, "beside 'format' other keywords are ignored by the grammar")
            return out
        if kind == "string":
            for keyword in ("minLength", "maxLength"):
                value = node.get(keyword)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise self.refuse(where, keyword, "it must be a non-negative integer")
            self.only(node, where, {"type", "minLength", "maxLength"}, "the grammar does not enforce it on a string")
            return out
        why = {"array": "an array needs 'items' for its bounds to be enforced",
               None: "give the schema a 'type' (or properties, items, enum ...) it applies to"}.get(
                   kind, f"the grammar does not enforce it on a{'n' if str(kind)[0] in 'aeiou' else ''} {kind}")
        self.only(node, where, {"type"}, why)
        return out

    def object(self, node: dict[str, Any], out: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        self.only(node, where, {"type", "properties", "required", "additionalProperties"},
                  "the grammar does not enforce it on an object")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise self.refuse(where, "properties", "it must be an object of schemas")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.refuse(where, "required", "it must be a list of property names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.refuse(where, "required", f"'{missing[0]}' is required but not among 'properties'")
        out["properties"] = {k: self.node(v, f"{where}.properties.{k}".lstrip("."), depth + 1)
                             for k, v in properties.items()}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = self.node(extra, f"{where}.additionalProperties".lstrip("."), depth + 1)
        elif extra is not None and not isinstance(extra, bool):
            raise self.refuse(where, "additionalProperties", "it must be true, false or a schema")
        return out

    def array(self, node: dict[str, Any], out: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        items = node.get("items")
        if "prefixItems" in node or isinstance(items, list):
            key = "prefixItems" if "prefixItems" in node else "items"
            tuple_items = node[key]
            if not isinstance(tuple_items, list) or (key == "prefixItems" and items is not None):
                raise self.refuse(where, key, "a tuple needs a list of schemas and nothing after it")
            self.only(node, where, {"type", key}, "the grammar does not enforce it on a tuple")
            out[key] = [self.node(s, f"{where}.{key}[{i}]".lstrip("."), depth + 1)
                        for i, s in enumerate(tuple_items)]
            return out
        self.only(node, where, {"type", "items", "minItems", "maxItems"}, "the grammar does not enforce it on an array")
        for keyword in ("minItems", "maxItems"):
            value = node.get(keyword)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise self.refuse(where, keyword, "it must be a non-negative integer")
        out["items"] = self.node(items, f"{where}.items".lstrip("."), depth + 1)
        return out

    def integer_range(self, node: dict[str, Any], where: str) -> dict[str, Any]:
        self.only(node, where, {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
                  "the grammar does not enforce it on an integer")
        lows, highs = [], []
        for keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            value = node.get(keyword)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.refuse(where, keyword, "it must be a number")
            match keyword:
                case "minimum":
                    lows.append(math.ceil(value))
                case "exclusiveMinimum":
                    lows.append(math.floor(value) + 1)
                case "maximum":
                    highs.append(math.floor(value))
                case _:
                    highs.append(math.ceil(value) - 1)
        if not lows or not highs:
            keyword = next(k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in node)
            raise self.refuse(where, keyword, "only integer ranges bounded on both sides are enforced "
                                              f"(at most {MAX_INTEGER_CHOICES} values)")
        low, high = max(lows), min(highs)
        if high < low:
            raise self.refuse(where, "maximum", f"the range {low}..{high} is empty")
        if high - low + 1 > MAX_INTEGER_CHOICES:
            raise self.refuse(where, "maximum", f"the range {low}..{high} has more than {MAX_INTEGER_CHOICES} values")
        return {k: v for k, v in node.items() if k in ANNOTATIONS} | {"type": "integer",
                                                                      "enum": list(range(low, high + 1))}


def parse_output(value: object, param: str) -> StructuredOutput | None:
    """A ``format`` field as the MQTT and Ollama requests carry it: "json", a JSON schema, or nothing."""
    if value is None or value == "":
        return None
    if value == "json":
        return json_mode()
    if isinstance(value, dict):
        return from_schema(value, param)
    raise BadRequest(f"'{param}' must be \"json\" or a JSON schema object", param=param)


def parsed_value(output: StructuredOutput | None, text: str) -> Any:
    """The answer as a JSON value for a JSON-shaped request (None otherwise, or when it does not parse)."""
    if output is None or not output.is_json:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def check_complete(output: StructuredOutput, completion: Completion) -> None:
    """Raise :class:`Truncated` when a constrained answer stopped before its grammar was satisfied: the engine only
    ends a grammar-bound answer by itself once it is complete, so "length" (max_tokens or a full context) cuts it,
    and a JSON answer that does not parse was cut by a stop sequence."""
    if completion.finish_reason == "length":
        raise Truncated(f"the structured answer was cut after {completion.usage.completion_tokens} tokens, before "
                        f"it was complete: raise max_tokens", param="max_tokens")
    if output.is_json:
        try:
            json.loads(completion.text)
        except ValueError:
            raise Truncated("the JSON answer was cut by a stop sequence before it was complete",
                            param="stop") from None


# llama-cpp-python 0.3.36's schema converter lets a JSON string hold raw control characters (its ``char`` rule is
# ``[^"\\]``), which JSON forbids: a model that writes a newline inside a string gave an answer that json.loads
# refuses (1 of 200 in bench/structured.py). llama.cpp's own converter and llama-cpp-python's JSON_GBNF exclude
# U+0000-U+001F and U+007F; the same rule replaces the lax one here.
_LAX_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def strict_json_strings(grammar: str) -> str:
    """A converted schema's GBNF with its strings held to JSON's characters (unchanged if already strict)."""
    return "\n".join(_STRICT_CHAR + line[len(_LAX_CHAR):] if line.startswith(_LAX_CHAR) else line
                     for line in grammar.split("\n"))
