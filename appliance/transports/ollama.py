"""Ollama-compatible request and response shapes for ``/api/*`` (what Home Assistant, Open WebUI and the ``ollama``
Python client speak).

Requests are mapped onto the appliance's own :class:`GenerateRequest`, as the OpenAI routes are; values the
appliance cannot honour (images, ``think``, a raw ``template`` ...) are refused with ``bad_request`` naming
them. ``tools`` go to appliance/tools.py, and a call comes back as ``message.tool_calls`` (arguments as an object).
Model names are Ollama's ``name:tag``: a catalog id ``x`` is listed as ``x:latest`` and either form is
accepted. Durations are nanoseconds and timestamps RFC 3339, as Ollama writes them.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from appliance.catalog.entry import ModelEntry
from appliance.errors import ApplianceError, BadRequest
from appliance.protocol import Completion, GenerateRequest, parse_generate
from appliance.tools import CallDetector, ToolCall, ToolUse

QUANTISATION = re.compile(r"(?i)(?:^|[-_.])(i?q\d(?:_[a-z0-9]{1,2}){0,2}|bf16|f16|f32)(?:$|[-.])")
#: the Ollama API version whose shapes these routes follow (the ollama 0.6.3 client is tested against them)
OLLAMA_API_VERSION = "0.6.3"
TAG = "latest"
#: the appliance keeps its model loaded until the configuration changes: /api/ps says so with a far expiry
NEVER_EXPIRES = datetime(2318, 1, 1, tzinfo=UTC)

# Ollama's options -> the appliance's sampling fields
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_tokens",
            "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty"}
# accepted and documented as having no effect here: the context, threads and memory settings are the operator's
_OPTIONS_FIXED = ("num_ctx", "num_batch", "num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa",
                  "low_vram", "num_keep")
_COMMON = ("model", "stream", "format", "options", "keep_alive")
_REFUSED = {"images": "images are not supported: the models here read text only",
            "think": "'think' is not supported: the models here have no separate reasoning output",
            "template": "a request's own 'template' is not supported: the model's chat template is used",
            "context": "'context' (token ids of an earlier answer) is not supported: send the conversation as "
                       "'messages' to /api/chat",
            "suffix": "'suffix' (fill in the middle) is not supported"}



def model_name(model_id: str) -> str:
    return model_id if ":" in model_id else f"{model_id}:{TAG}"


def model_id(name: object) -> str | None:
    """The catalog id an Ollama model name refers to (``x:latest`` and ``x`` are the same model)."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise BadRequest("'model' must be a string", param="model")
    return name[: -len(TAG) - 1] if name.endswith(":" + TAG) else name


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object", param="options")
    mapped = {}
    for name, value in options.items():
        if name in _OPTIONS:
            if value is not None:
                mapped[_OPTIONS[name]] = value
        elif name not in _OPTIONS_FIXED:
            raise BadRequest(f"option '{name}' is not supported by this appliance", param=f"options.{name}")
    return mapped


def _common(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    for name, reason in _REFUSED.items():
        if body.get(name) not in (None, False, [], "", {}):
            raise BadRequest(reason, param=name)
    unknown = sorted(set(body) - known - set(_COMMON) - set(_REFUSED))
    if unknown:
        raise BadRequest(f"unknown parameter '{unknown[0]}'", param=unknown[0])
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not isinstance(keep_alive, (str, int, float)):
        raise BadRequest("'keep_alive' must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    mapped = _options(body)
    mapped["model"] = model_id(body.get("model"))
    stream = body.get("stream", True)  # Ollama streams unless told not to
    mapped["stream"] = stream if stream is not None else True
    if body.get("format") not in (None, ""):
        mapped["format"] = body["format"]
    return {k: v for k, v in mapped.items() if v is not None}


def chat_request(body: Any) -> GenerateRequest:
    mapped = _common(body, {"messages", "tools"})
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required", param="messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict) and message.get("images"):
                raise BadRequest(f"'messages[{i}].images' is not supported: {_REFUSED['images']}",
                                 param=f"messages[{i}].images")
    mapped["messages"] = messages
    if body.get("tools"):
        mapped["tools"] = body["tools"]
    mapped["id"] = "chat-" + uuid.uuid4().hex
    return parse_generate(mapped)


def generate_request(body: Any) -> GenerateRequest | None:
    """The request, or None for Ollama's "load the model" call (no prompt)."""
    if isinstance(body, dict) and body.get("tools"):  # as Ollama: calls are a chat feature
        raise BadRequest("'tools' is for /api/chat: calls are written through the model's chat template",
                         param="tools")
    mapped = _common(body, {"prompt", "system", "raw"})
    prompt, system, raw = body.get("prompt"), body.get("system"), body.get("raw", False)
    if not isinstance(raw, bool):
        raise BadRequest("'raw' must be true or false", param="raw")
    if system is not None and not isinstance(system, str):
        raise BadRequest("'system' must be a string", param="system")
    if prompt in (None, ""):
        return None
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", param="prompt")
    if raw:
        if system:
            raise BadRequest("'system' cannot be used with 'raw': a raw prompt is sent as it is", param="system")
        mapped["prompt"] = prompt
    else:  # like Ollama: the prompt goes through the model's chat template
        mapped["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
    mapped["id"] = "gen-" + uuid.uuid4().hex
    return parse_generate(mapped)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(entry: ModelEntry) -> dict[str, Any]:
    found = QUANTISATION.search(entry.path.stem)
    quantisation = found.group(1).upper() if found else "unknown"
    fmt = {"llama_cpp": "gguf", "rwkv": "pth"}.get(entry.backend, entry.backend)
    return {"parent_model": "", "format": fmt, "family": entry.family, "families": [entry.family],
            "parameter_size": "", "quantization_level": quantisation}


def _digest(entry: ModelEntry) -> str:
    # the catalog id, path and size identify a model file here; hashing a 100 MB file per listing would be slow
    return hashlib.sha256(f"{entry.id}\0{entry.path}\0{entry.size}".encode()).hexdigest()


def _modified(entry: ModelEntry) -> str:
    try:
        stamp = entry.path.stat().st_mtime
    except OSError:
        stamp = 0.0
    return datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")


def _size(entry: ModelEntry) -> int:
    try:
        return entry.size or entry.path.stat().st_size
    except OSError:
        return 0


def tag(entry: ModelEntry) -> dict[str, Any]:
    name = model_name(entry.id)
    return {"name": name, "model": name, "modified_at": _modified(entry), "size": _size(entry),
            "digest": _digest(entry), "details": _details(entry)}


def running(entry: ModelEntry, context_size: int | None) -> dict[str, Any]:
    name = model_name(entry.id)
    return {"name": name, "model": name, "size": _size(entry), "digest": _digest(entry), "details": _details(entry),
            "expires_at": NEVER_EXPIRES.isoformat().replace("+00:00", "Z"), "size_vram": 0,
            "context_length": context_size}


def show(entry: ModelEntry, context_size: int) -> dict[str, Any]:
    parameters = []
    if entry.temperature is not None:
        parameters.append(f"temperature {entry.temperature}")
    if entry.top_p is not None:
        parameters.append(f"top_p {entry.top_p}")
    return {"license": entry.licence, "modelfile": f"FROM {entry.path.name}\n", "parameters": "\n".join(parameters),
            "template": entry.template or "", "system": entry.system_prompt or "", "details": _details(entry),
            "model_info": {"general.architecture": entry.family, f"{entry.family}.context_length": context_size},
            "capabilities": ["completion"], "modified_at": _modified(entry)}


def _counts(c: Completion) -> dict[str, Any]:
    eval_ns = int(c.usage.completion_tokens / c.tokens_per_s * 1e9) if c.tokens_per_s > 0 else 0
    prompt_ns = int(c.ttft_ms * 1e6)
    return {"total_duration": prompt_ns + eval_ns, "load_duration": 0,
            "prompt_eval_count": c.usage.prompt_tokens, "prompt_eval_duration": prompt_ns,
            "eval_count": c.usage.completion_tokens, "eval_duration": eval_ns}


class ResponseShaper:
    """The NDJSON lines (or the one object) of one /api/chat ("chat") or /api/generate ("text") request."""

    def __init__(self, model: str, kind: str, tools: ToolUse | None = None) -> None:
        self.model, self.kind = model_name(model), kind
        self.detector = CallDetector(tools if kind == "chat" else None)

    def _line(self, text: str, done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        line["done"] = done
        return line

    def delta(self, text: str) -> dict[str, Any] | None:
        """The line for a piece of text, or None while the piece may be the start of a tool call."""
        content = self.detector.push(text)
        return self._line(content, False) if content else None

    def final(self, c: Completion, *, streamed: bool) -> dict[str, Any]:
        # Ollama's done_reason is "stop" or "length", as OpenAI's finish_reason ("stop" after a call too)
        calls, _ = self.detector.finish(c.text)
        line = {**self._line("" if streamed or calls else c.text, True), "done_reason": c.finish_reason,
                **_counts(c)}
        if calls and not streamed:
            line["message"]["tool_calls"] = _calls(calls)
        return line

    def final_lines(self, c: Completion) -> list[dict[str, Any]]:
        """A stream's last lines: as Ollama does, a call comes whole on a line of its own, before the done line."""
        calls, rest = self.detector.finish(c.text)
        lines = []
        if calls:
            line = self._line("", False)
            line["message"]["tool_calls"] = _calls(calls)
            lines.append(line)
        elif rest:
            lines.append(self._line(rest, False))
        return [*lines, {**self._line("", True), "done_reason": c.finish_reason, **_counts(c)}]

    def loaded(self) -> dict[str, Any]:
        """The answer to a /api/generate with no prompt: Ollama's way of loading a model."""
        return {**self._line("", True), "done_reason": "load"}


def _calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    # Ollama's shape: no id, the arguments as an object
    return [{"function": {"name": c.name, "arguments": c.arguments_object()}} for c in calls]


def error_body(error: ApplianceError) -> dict[str, Any]:
    """Ollama's error shape ({"error": text}), with the appliance's code beside it for clients that look."""
    return {"error": error.message, "code": error.code, "param": error.param}
