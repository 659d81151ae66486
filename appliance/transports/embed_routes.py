"""The embedding routes: OpenAI ``POST /v1/embeddings`` and Ollama ``POST /api/embed``, on the same server and
behind the same API key as the others. The shapes are tensors/embed_api.py's; the work is the ONNX worker's
(tensors/pool.py), so an embedding never waits behind a generation.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from flask import Flask, Response

from appliance.errors import ApplianceError, Internal, UnknownModel
from appliance.protocol import EmbedResult
from appliance.tensors import embed_api
from appliance.tensors.embed_api import EmbedRequest
from appliance.tensors.pool import Answer, InferencePool
from appliance.transports import ollama

ErrorResponse = Callable[[ApplianceError, bool], Response]


def register(app: Flask, infer: InferencePool | None, body_json: Callable[[], object],
             take_seat: Callable[[], Callable[[], None]], error_response: ErrorResponse, result_wait: float) -> None:

    def embedded(request: EmbedRequest) -> EmbedResult | Response:
        """The result, or the error response; holds an HTTP seat while the worker embeds (as /v1/infer does)."""
        if infer is None or not infer.embedders:
            raise UnknownModel(f"unknown embedding model '{request.model}' (available: none)", param="model")
        answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        give_back = take_seat()
        try:
            infer.embed(request, answers.put, "http")
            answer = answers.get(timeout=result_wait)
        except queue.Empty:
            return error_response(Internal("no reply from the inference worker"), False)
        finally:
            give_back()
        if isinstance(answer, ApplianceError):
            return error_response(answer, True)
        if not isinstance(answer, EmbedResult):  # the pool answers an Embed with an EmbedResult or an error
            return error_response(Internal("the inference worker answered with no vectors"), False)
        return answer

    @app.post("/v1/embeddings")
    def openai_embeddings() -> Response | dict[str, Any]:
        request, encoding = embed_api.openai_request(body_json())
        result = embedded(request)
        return result if isinstance(result, Response) else embed_api.openai_response(result, encoding)

    @app.post("/api/embed")
    def ollama_embed() -> Response | dict[str, Any]:
        body = body_json()
        request = embed_api.ollama_request(body, ollama.model_id(body.get("model") if isinstance(body, dict)
                                                                 else None))
        result = embedded(request)
        if isinstance(result, Response):
            return result
        return embed_api.ollama_response(result, ollama.model_name(result.model))
