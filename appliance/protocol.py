"""The wire format, in one place: request validation and the JSON of chunks, results and errors.

Both transports build a :class:`GenerateRequest` here and serialise what the scheduler hands back with the
``*_payload`` functions, so MQTT and HTTP accept the same fields with the same limits and report the same codes.
See docs/protocol.md for the reference.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.errors import ApplianceError, BadRequest
from appliance.structured import StructuredOutput, from_grammar, from_schema, parse_output, parsed_value
from appliance.tools import ToolCall, ToolUse, message_calls, parse_calls, parse_tools

ROLES = ("system", "user", "assistant", "tool")
MAX_ID_LENGTH = 256
MAX_STOP_SEQUENCES = 8


TEMPERATURE, TOP_P = 0.8, 0.95  # llama-cpp-python's own defaults, so results match it


MAX_TOPIC_BYTES = 65_535  # an MQTT string's length is two bytes


def reply_topic_problem(topic: object) -> str | None:
    """What makes ``topic`` unusable as a reply topic, or None. Besides wildcards, mosquitto refuses (as a
    malformed packet, closing the connection) a topic with a control character (U+0000-U+001F, U+007F-U+009F), a
    Unicode non-character or more than 65,535 bytes; paho then sends the same unacknowledged reply again on every
    reconnect, so a topic like that must never reach a publish (found by `make fuzz`)."""
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty string (an MQTT topic)"
    if "+" in topic or "#" in topic:
        return "must be an MQTT topic without wildcards (+, #)"
    for char in topic:
        point = ord(char)
        if point <= 0x1F or 0x7F <= point <= 0x9F:
            return f"must not contain control characters (U+{point:04X})"
        if 0xFDD0 <= point <= 0xFDEF or (point & 0xFFFF) >= 0xFFFE or 0xD800 <= point <= 0xDFFF:
            return f"must not contain Unicode non-characters or surrogates (U+{point:04X})"
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"is longer than an MQTT topic can be ({MAX_TOPIC_BYTES} bytes)"
    return None

@dataclass(frozen=True)
class SamplingParams:
    """Generation settings; the defaults are llama-cpp-python's own, so results match it. A request leaves
    ``max_tokens``, ``temperature`` and ``top_p`` None when it does not set them: the scheduler then fills in the
    configured and the model's defaults (:meth:`with_defaults`)."""

    max_tokens: int | None = None  # None: worker.default_max_tokens
    temperature: float | None = TEMPERATURE  # None: the catalog entry's, else TEMPERATURE
    top_p: float | None = TOP_P  # None: the catalog entry's, else TOP_P
    top_k: int = 40
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def with_defaults(self, *, max_tokens: int, temperature: float | None, top_p: float | None) -> SamplingParams:
        """Every field set: the request's own values, else these defaults (None: llama-cpp-python's)."""
        def pick(own: float | None, default: float | None, fallback: float) -> float:
            return own if own is not None else default if default is not None else fallback
        return replace(self, max_tokens=self.max_tokens if self.max_tokens is not None else max_tokens,
                       temperature=pick(self.temperature, temperature, TEMPERATURE),
                       top_p=pick(self.top_p, top_p, TOP_P))

    @property
    def sampling_temperature(self) -> float:
        """The temperature engines sample with: the request's or the defaults' (with_defaults), else TEMPERATURE."""
        return TEMPERATURE if self.temperature is None else self.temperature

    @property
    def sampling_top_p(self) -> float:
        return TOP_P if self.top_p is None else self.top_p


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    #: an assistant turn's calls, sent back by the client with the conversation (appliance/tools.py)
    tool_calls: tuple[ToolCall, ...] = ()
    #: a "tool" turn: the call it answers (OpenAI) and the function's name (Ollama's tool_name)
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def uses_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generation request, independent of the transport that carried it."""

    id: str | int
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    model: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    #: MQTT 3.1.1 fallback for the v5 Response Topic
    reply_to: str | None = None
    #: "low" requests are the first refused when memory runs low
    priority: str = "normal"
    #: the answer must be JSON (any object, or one a schema describes) or follow a GBNF grammar
    structured: StructuredOutput | None = None
    #: functions the model may call (appliance/tools.py)
    tools: ToolUse | None = None

    @property
    def uses_tools(self) -> bool:
        """Whether the request needs a model whose chat template supports tools."""
        return self.tools is not None or any(m.uses_tools for m in self.messages or ())


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """The outcome of one finished generation."""

    text: str
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length" (max_tokens / context full)
    usage: Usage
    ttft_ms: float
    tokens_per_s: float
    model: str


@dataclass(frozen=True)
class TensorResult:
    """The outcome of one tensor-model request: each output's values, with labels and scores where declared."""

    id: str | int | None
    model: str
    outputs: dict[str, dict[str, Any]]
    inference_ms: float


@dataclass(frozen=True)
class EmbedResult:
    """The outcome of one embedding request: one L2-normalised vector per input text, in order."""

    id: str | int | None
    model: str
    vectors: list[list[float]]
    tokens: int  # tokens the model read, special tokens included
    inference_ms: float


# ---------------------------------------------------------------------------------------------------------------
# validation

_FIELDS = {"id", "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty",
           "stop", "seed", "stream", "reply_to", "priority", "format", "json_schema", "grammar", "tools",
           "tool_choice"}
STRUCTURED_FIELDS = ("format", "json_schema", "grammar")
PRIORITIES = ("normal", "low")


def _number(body: dict[str, Any], name: str, default: float | None, low: float, high: float, *,
            integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"'{name}' must be {kind}, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value if integer else float(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    if any(s == "" for s in stop):
        raise BadRequest("'stop' sequences must not be empty", param="stop")
    return tuple(stop)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'", param=where)
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        if isinstance(content, list):  # OpenAI content parts: only text parts are meaningful here
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            texts = [p for p in parts if isinstance(p, str)]
            if len(texts) != len(content):
                raise BadRequest(f"'{where}.content' parts must all be text", param=f"{where}.content")
            content = "".join(texts)
        calls = message_calls(item.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ()
        if content is None and calls:  # OpenAI sends a calling turn's content as null
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string", param=f"{where}.content")
        call_id, name = item.get("tool_call_id"), item.get("tool_name", item.get("name"))
        if role == "tool" and not all(v is None or isinstance(v, str) for v in (call_id, name)):
            raise BadRequest(f"'{where}.tool_call_id' and its name must be strings", param=where)
        out.append(Message(role, content, calls, call_id if role == "tool" else None,
                           name if role == "tool" else None))
    return tuple(out)


def with_system_prompt(messages: tuple[Message, ...], system_prompt: str | None) -> tuple[Message, ...]:
    """``messages`` with ``system_prompt`` put first when none of them is a system message (a request's own system
    message always wins; no prompt, or an empty one, changes nothing)."""
    if not system_prompt or any(m.role == "system" for m in messages):
        return messages
    return (Message("system", system_prompt), *messages)


def request_id(body: object) -> str | int | None:
    """The request's id if it has a usable one, so even a rejected request can be answered by id."""
    rid = body.get("id") if isinstance(body, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    if isinstance(rid, str) and not 0 < len(rid) <= MAX_ID_LENGTH:
        return None
    return rid


def parse_generate(body: Any) -> GenerateRequest:
    """Validate a generate request body (already JSON-decoded). Unknown fields are refused: a typo such as
    ``max_token`` must not pass silently (the HTTP layer maps OpenAI's fields onto these first)."""
    if not isinstance(body, dict):
        raise BadRequest(f"request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}'", param=unknown[0])
    rid = body.get("id")
    if rid is None:
        rid = uuid.uuid4().hex
    elif request_id(body) is None:
        raise BadRequest(f"'id' must be a string of 1-{MAX_ID_LENGTH} characters or an integer", param="id")

    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise BadRequest("exactly one of 'prompt' or 'messages' is required",
                         param="prompt" if prompt is None else "messages")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest(f"'prompt' must be a string, got {type(prompt).__name__}", param="prompt")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequest("'model' must be a non-empty string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    reply_to = body.get("reply_to")
    if reply_to is not None and (problem := reply_topic_problem(reply_to)) is not None:
        raise BadRequest(f"'reply_to' {problem}", param="reply_to")
    priority = body.get("priority", "normal")
    if priority not in PRIORITIES:
        raise BadRequest(f"'priority' must be one of {', '.join(PRIORITIES)}", param="priority")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _number(body, "max_tokens", 0, 1, 1 << 20, integer=True)
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", 0, -1, 0xFFFFFFFF, integer=True)
        seed = None if seed == -1 else seed

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", None, 0.0, 5.0),
        top_p=_number(body, "top_p", None, 0.0, 1.0),
        top_k=_number(body, "top_k", 40, 0, 1 << 20, integer=True),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0),
        stop=_stop(body),
        seed=seed,
    )
    tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    if tools is not None and messages is None:
        raise BadRequest("'tools' needs 'messages': calls are written through the model's chat template",
                         param="tools")
    structured = _structured(body)
    if tools is not None and tools.calls and structured is not None:
        raise BadRequest("'tools' cannot be combined with a structured output (the call has its own grammar); "
                         "use tool_choice \"none\" to get a structured answer", param="tools")
    return GenerateRequest(id=rid, prompt=prompt, messages=_messages(messages) if messages is not None else None,
                           model=model, params=params, stream=stream, reply_to=reply_to, priority=priority,
                           structured=structured, tools=tools)


def _structured(body: dict[str, Any]) -> StructuredOutput | None:
    given = [name for name in STRUCTURED_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise BadRequest(f"give at most one of {', '.join(STRUCTURED_FIELDS)} (got '{given[0]}' and '{given[1]}')",
                         param=given[1])
    if not given:
        return None
    name = given[0]
    if name == "json_schema":
        return from_schema(body[name], name)
    if name == "grammar":
        return from_grammar(body[name], name)
    return parse_output(body[name], name)


# ---------------------------------------------------------------------------------------------------------------
# replies

def chunk_payload(rid: str | int, seq: int, delta: str) -> dict[str, Any]:
    return {"type": "chunk", "id": rid, "seq": seq, "delta": delta}


def result_payload(rid: str | int, completion: Completion, structured: StructuredOutput | None = None,
                   tools: ToolUse | None = None) -> dict[str, Any]:
    """A finished answer; a JSON-shaped request's carries the answer parsed as well (``parsed``), and an answer
    that calls tools its calls (``tool_calls``, OpenAI's shape) with ``finish_reason`` "tool_calls"."""
    usage = completion.usage
    extra: dict[str, Any] = {}
    if structured and structured.is_json:
        extra["parsed"] = parsed_value(structured, completion.text)
    calls = parse_calls(tools, completion.text)
    if calls:
        extra["tool_calls"] = [openai_call(c) for c in calls]
    return {
        "type": "result",
        "id": rid,
        "model": completion.model,
        "text": completion.text,
        "finish_reason": "tool_calls" if calls else completion.finish_reason,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens},
        "timings": {"ttft_ms": round(completion.ttft_ms, 2), "tokens_per_s": round(completion.tokens_per_s, 2)},
        **extra,
    }


def openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tensor_result_payload(result: TensorResult) -> dict[str, Any]:
    return {"type": "result", "id": result.id, "model": result.model, "outputs": result.outputs,
            "timings": {"inference_ms": round(result.inference_ms, 3)}}


def error_payload(rid: str | int | None, error: ApplianceError) -> dict[str, Any]:
    return {"type": "error", "id": rid, "error": error.to_dict()}


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
