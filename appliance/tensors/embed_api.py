"""Embedding requests and answers in the three dialects: OpenAI ``POST /v1/embeddings``, Ollama ``POST /api/embed``
and the MQTT ``<prefix>/<device>/embed`` topic (docs/protocol.md, "Embeddings").

Each dialect is mapped onto one :class:`EmbedRequest`, checked here, in the parent, before the ONNX worker sees it:
``input`` is a string or a non-empty list of at most :data:`MAX_INPUTS` non-empty strings (token arrays, which the
OpenAI API also takes, are refused: the appliance's tokenizer is the model's own). Token limits are checked where
the tokenizer is, in the worker (tensors/embedder.py). Values the appliance cannot honour (``dimensions``) are
refused with ``bad_request`` naming the field, never ignored.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from appliance.errors import BadRequest
from appliance.protocol import MAX_ID_LENGTH, EmbedResult, request_id

MAX_INPUTS = 256  # texts per request: a page of a document split into passages, not a whole library


@dataclass(frozen=True)
class EmbedRequest:
    id: str | int | None
    model: str | None  # None: the catalog's first embedder (MQTT only; the HTTP dialects name one)
    texts: tuple[str, ...]
    truncate: bool  # cut a text over the model's token limit instead of refusing it


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown parameter '{unknown[0]}'", param=unknown[0])


def _texts(value: object) -> tuple[str, ...]:
    if value is None:
        raise BadRequest("'input' is required: a string or a list of strings", param="input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest(f"'input' must be a string or a list of strings, got {type(value).__name__}", param="input")
    if not items:
        raise BadRequest("'input' is an empty list: send at least one string", param="input")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"'input' has {len(items)} strings; at most {MAX_INPUTS} per request", param="input")
    for i, item in enumerate(items):
        where = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise BadRequest(f"'{where}' is a token array: send text (the appliance tokenizes it with the model's "
                             f"own tokenizer)", param=where)
        if not isinstance(item, str):
            raise BadRequest(f"'{where}' must be a string, got {type(item).__name__}", param=where)
        if not item:
            raise BadRequest(f"'{where}' is empty: an empty text has no meaning to embed", param=where)
    return tuple(items)


def _model(value: object, required: bool) -> str | None:
    if value in (None, "") and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest("'model' is required: the id of an embedding model (GET /v1/models)" if value in (None, "")
                         else "'model' must be a string", param="model")
    return value


def _truncate(body: dict[str, Any]) -> bool:
    value = body.get("truncate", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest("'truncate' must be true or false", param="truncate")
    return value


def _no_dimensions(body: dict[str, Any]) -> None:
    if body.get("dimensions") is not None:
        raise BadRequest("'dimensions' is not supported: the model's vectors have the size it was trained with",
                         param="dimensions")


# -- OpenAI ---------------------------------------------------------------------------------------------------------

ENCODINGS = ("float", "base64")


def openai_request(body: object) -> tuple[EmbedRequest, str]:
    """The request and its ``encoding_format`` (``float``, or ``base64``, which the openai client asks for by
    default: each vector's little-endian float32 bytes in base64)."""
    b = _object(body)
    _unknown(b, {"model", "input", "encoding_format", "dimensions", "user", "truncate"})
    _no_dimensions(b)
    encoding = b.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise BadRequest(f"'encoding_format' must be one of {', '.join(ENCODINGS)}, got {encoding!r}",
                         param="encoding_format")
    model = _model(b.get("model"), required=True)
    return EmbedRequest(None, model, _texts(b.get("input")), _truncate(b)), encoding


def _base64(vector: list[float]) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def openai_response(result: EmbedResult, encoding: str) -> dict[str, Any]:
    return {"object": "list", "model": result.model,
            "data": [{"object": "embedding", "index": i, "embedding": _base64(v) if encoding == "base64" else v}
                     for i, v in enumerate(result.vectors)],
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}


# -- Ollama ---------------------------------------------------------------------------------------------------------

def ollama_request(body: object, model_id: str | None) -> EmbedRequest:
    """``model_id`` is the body's ``model`` as a catalog id (``x:latest`` is ``x``); ``keep_alive`` and ``options``
    are accepted and change nothing (the ONNX worker keeps its models open; no option applies to an embedder)."""
    b = _object(body)
    _unknown(b, {"model", "input", "truncate", "dimensions", "keep_alive", "options"})
    _no_dimensions(b)
    if b.get("options") is not None and not isinstance(b["options"], dict):
        raise BadRequest("'options' must be an object", param="options")
    return EmbedRequest(None, _model(model_id, required=True), _texts(b.get("input")), _truncate(b))


def ollama_response(result: EmbedResult, name: str) -> dict[str, Any]:
    nanoseconds = int(result.inference_ms * 1e6)
    return {"model": name, "embeddings": result.vectors, "total_duration": nanoseconds, "load_duration": 0,
            "prompt_eval_count": result.tokens}


# -- MQTT -----------------------------------------------------------------------------------------------------------

def mqtt_request(body: object) -> EmbedRequest:
    b = _object(body)
    _unknown(b, {"id", "model", "input", "truncate", "reply_to"})
    rid = request_id(b)
    if b.get("id") is not None and rid is None:
        raise BadRequest(f"'id' must be a string (1-{MAX_ID_LENGTH} characters) or an integer", param="id")
    return EmbedRequest(rid, _model(b.get("model"), required=False), _texts(b.get("input")), _truncate(b))


def mqtt_payload(result: EmbedResult) -> dict[str, Any]:
    return {"type": "result", "id": result.id, "model": result.model, "embeddings": result.vectors,
            "usage": {"tokens": result.tokens}, "timings": {"inference_ms": round(result.inference_ms, 3)}}
