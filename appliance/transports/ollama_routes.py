"""The Ollama-compatible routes (``/api/*``), beside the OpenAI ones on the same server and behind the same API key.

The shapes are :mod:`appliance.transports.ollama`'s; this module only wires them to Flask. Listing routes
(``/api/tags``, ``/api/ps``, ``/api/version``) never wait for the generation worker, so a client polling them
while a long answer is generated is answered at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from typing import Any

from flask import Flask, Response

from appliance.catalog.entry import ModelEntry
from appliance.errors import ApplianceError, BadRequest, UnknownModel
from appliance.generation.scheduler import Job, Scheduler
from appliance.messages import Chunk, Done, Failed
from appliance.protocol import Completion, GenerateRequest
from appliance.status import StatusBoard
from appliance.transports import ollama

Events = Generator[Chunk | Done | Failed, None, None]
Run = Callable[[GenerateRequest], tuple[Job, Events]]
FinalResponse = Callable[[Events, Callable[[Completion], dict[str, Any]],
                          Callable[[ApplianceError], dict[str, Any]]], Response]


def _ndjson(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def register(app: Flask, scheduler: Scheduler, status: StatusBoard, run: Run, final_response: FinalResponse,
             body_json: Callable[[], object], seated: Callable[[Callable[[], Response]], Response]) -> None:

    def served_entries() -> list[ModelEntry]:
        if scheduler.config.models.switch:
            return [e for e in scheduler.catalog if e.generates_text]
        return [scheduler.catalog.get(scheduler.default_model)]

    def entry_named(name: object) -> ModelEntry:
        wanted = ollama.model_id(name)
        if wanted is None:
            raise BadRequest("'model' is required", param="model")
        for entry in served_entries():
            if entry.id == wanted:
                return entry
        available = ", ".join(ollama.model_name(e.id) for e in served_entries())
        raise UnknownModel(f"model '{name}' not found (available: {available})", param="model")

    @app.route("/api/version", methods=["GET", "HEAD"])
    def version() -> dict[str, Any]:
        return {"version": ollama.OLLAMA_API_VERSION}

    @app.get("/api/tags")
    def tags() -> dict[str, Any]:
        return {"models": [ollama.tag(e) for e in served_entries()]}

    @app.get("/api/ps")
    def ps() -> dict[str, Any]:
        loaded = status.current.model
        entries = [e for e in served_entries() if e.id == loaded]
        return {"models": [ollama.running(e, scheduler.config.worker.context_size) for e in entries]}

    @app.post("/api/show")
    def show() -> dict[str, Any]:
        body = body_json()
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        entry = entry_named(body.get("model") or body.get("name"))  # "name" is the older spelling
        return ollama.show(entry, scheduler.config.worker.context_size)

    @app.post("/api/chat")
    def chat() -> Response:
        generate_request = ollama.chat_request(body_json())
        return seated(lambda: generation(generate_request, "chat"))

    @app.post("/api/generate")
    def generate() -> Response:
        body = body_json()
        generate_request = ollama.generate_request(body)
        if generate_request is None:  # no prompt: Ollama's "load this model", answered once the model is known
            model = ollama.model_id(body.get("model") if isinstance(body, dict) else None)
            shaper = ollama.ResponseShaper(entry_named(model or scheduler.default_model).id, "text")
            return Response(json.dumps(shaper.loaded()), mimetype="application/json")
        return seated(lambda: generation(generate_request, "text"))

    def generation(generate_request: GenerateRequest, kind: str) -> Response:
        job, events = run(generate_request)
        shaper = ollama.ResponseShaper(job.model_id, kind, generate_request.tools)
        if not generate_request.stream:
            return final_response(events, lambda c: shaper.final(c, streamed=False), ollama.error_body)
        return Response(stream(events, shaper), mimetype="application/x-ndjson",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream(events: Events, shaper: ollama.ResponseShaper) -> Iterator[bytes]:
        with closing(events):
            for event in events:
                match event:
                    case Chunk(text=text):
                        if (line := shaper.delta(text)) is not None:
                            yield _ndjson(line)
                    case Done(completion=completion):
                        for line in shaper.final_lines(completion):
                            yield _ndjson(line)
                    case Failed(error=error):  # the ollama client raises ResponseError on a line with "error"
                        yield _ndjson(ollama.error_body(error))
