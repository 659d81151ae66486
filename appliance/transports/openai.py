"""OpenAI-compatible request and response shapes for ``/v1/completions`` and ``/v1/chat/completions``.

Requests are mapped onto the appliance's own :class:`GenerateRequest` (one validator for every transport); values
the appliance cannot honour (``n > 1``, ``logprobs``, ``echo``, legacy ``functions`` ...) are refused with
``bad_request`` naming the parameter rather than silently ignored. ``response_format`` (``json_object`` or
``json_schema``) and llama-cpp-python's ``grammar`` constrain the answer (appliance/structured.py); its extensions
``top_k`` and ``repeat_penalty`` are accepted. ``tools`` and ``tool_choice`` go to appliance/tools.py; an answer
that calls a tool comes back as ``message.tool_calls`` (streamed: one ``delta.tool_calls`` chunk once the call is
complete).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from appliance.errors import ApplianceError, BadRequest
from appliance.protocol import Completion, GenerateRequest, openai_call, parse_generate
from appliance.tools import CallDetector, ToolCall

_COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "stop", "seed", "stream",
           "priority")
# accepted for compatibility; their neutral values change nothing
_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
            "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "functions": None, "function_call": None}
# parallel_tool_calls: an answer makes at most one call either way (appliance/tools.py)
_IGNORED = ("user", "stream_options", "metadata", "store", "service_tier", "min_p", "typical_p",
            "parallel_tool_calls")


def _check_neutral(body: dict[str, Any]) -> None:
    for name, neutral in _NEUTRAL.items():
        value = body.get(name, neutral)
        if value in (neutral, None, {}, []):
            continue
        raise BadRequest(f"'{name}' = {value!r} is not supported by this appliance", param=name)


def _to_request(body: Any, kind: str) -> GenerateRequest:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    _check_neutral(body)
    known = set(_COMMON) | set(_NEUTRAL) | set(_IGNORED) | {"prompt", "messages", "max_completion_tokens",
                                                             "response_format", "grammar", "tools", "tool_choice"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown parameter '{unknown[0]}'", param=unknown[0])
    mapped = {k: body[k] for k in _COMMON if body.get(k) is not None}
    if kind == "chat":
        if "prompt" in body:
            raise BadRequest("use 'messages' with /v1/chat/completions ('prompt' is for /v1/completions)",
                             param="prompt")
        mapped["messages"] = body.get("messages")
        if body.get("max_completion_tokens") is not None:
            mapped["max_tokens"] = body["max_completion_tokens"]
        if mapped["messages"] is None:
            raise BadRequest("'messages' is required", param="messages")
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                mapped[name] = body[name]
    else:
        if "messages" in body:
            raise BadRequest("use 'prompt' with /v1/completions ('messages' is for /v1/chat/completions)",
                             param="messages")
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise BadRequest("'prompt' must be a string or a list of exactly one string", param="prompt")
            prompt = prompt[0]
        if prompt is None:
            raise BadRequest("'prompt' is required", param="prompt")
        mapped["prompt"] = prompt
    mapped.update(_response_format(body.get("response_format")))
    if body.get("grammar") is not None:  # llama-cpp-python's server extension: a GBNF grammar
        mapped["grammar"] = body["grammar"]
    mapped["id"] = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    return parse_generate(mapped)


def _response_format(value: object) -> dict[str, Any]:
    """OpenAI's response_format as the appliance's structured-output fields (see appliance/structured.py)."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"format": "json"}
    if kind == "json_schema":
        spec = value.get("json_schema") if isinstance(value, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object",
                             param="response_format.json_schema.schema")
        return {"json_schema": schema}
    raise BadRequest("'response_format.type' must be text, json_object or json_schema",
                     param="response_format.type")


def completion_request(body: Any) -> GenerateRequest:
    return _to_request(body, "text")


def chat_request(body: Any) -> GenerateRequest:
    return _to_request(body, "chat")


def wants_usage_in_stream(body: object) -> bool:
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _usage(c: Completion) -> dict[str, Any]:
    return {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
            "total_tokens": c.usage.total_tokens}


def _timings(c: Completion) -> dict[str, Any]:
    # llama-server reports per-response timings too; clients that do not know the key ignore it
    return {"ttft_ms": round(c.ttft_ms, 2), "tokens_per_s": round(c.tokens_per_s, 2)}


class ResponseShaper:
    """Builds response bodies and stream chunks for one request of one endpoint kind ("text" or "chat")."""

    def __init__(self, request: GenerateRequest, model: str, kind: str) -> None:
        self.id, self.model, self.kind = str(request.id), model, kind
        self.created = int(time.time())
        self.detector = CallDetector(request.tools if kind == "chat" else None)
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, c: Completion) -> dict[str, Any]:
        if self.kind == "chat":
            calls, _ = self.detector.finish(c.text)
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if calls:  # OpenAI's shape of a calling answer: no content, the calls, finish_reason "tool_calls"
                message = {"role": "assistant", "content": None, "tool_calls": [openai_call(x) for x in calls]}
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls" if calls else c.finish_reason}
        else:
            choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        return self._envelope(self.object, [choice], usage=_usage(c), timings=_timings(c))

    def _chunk(self, delta: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            return self._envelope("chat.completion.chunk",
                                  [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}])
        return self._envelope("text_completion", [{"index": 0, "text": delta or "", "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def first_chunk(self) -> dict[str, Any] | None:
        return self._chunk(None, None, role=True) if self.kind == "chat" else None

    def delta_chunk(self, text: str) -> dict[str, Any] | None:
        """The chunk for a piece of text, or None while the piece may be the start of a tool call."""
        content = self.detector.push(text)
        return self._chunk(content, None) if content else None

    def _calls_chunk(self, calls: tuple[ToolCall, ...]) -> dict[str, Any]:
        delta = {"tool_calls": [{"index": i, **openai_call(call)} for i, call in enumerate(calls)]}
        return self._envelope("chat.completion.chunk",
                              [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def final_chunks(self, c: Completion, include_usage: bool) -> list[dict[str, Any]]:
        calls, rest = self.detector.finish(c.text)
        chunks = [self._calls_chunk(calls)] if calls else [self._chunk(rest, None)] if rest else []
        chunks.append(self._chunk(None, "tool_calls" if calls else c.finish_reason))
        if include_usage:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            chunks.append(self._envelope(obj, [], usage=_usage(c), timings=_timings(c)))
        return chunks


def error_body(error: ApplianceError) -> dict[str, Any]:
    """OpenAI's error shape, with the appliance's code (the same codes as over MQTT)."""
    kind = "invalid_request_error" if int(error.http_status) < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
