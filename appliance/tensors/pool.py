"""The parent side of tensor inference: validate, queue (bounded), send to the ONNX child, answer, time out.

Requests are validated here against the catalog's declared inputs, so a malformed tensor never reaches the engine.
Embedding requests (tensors/embed_api.py) take the same queue to the same child. Each request's answer goes to its
callback once: a :class:`~appliance.protocol.TensorResult` (or :class:`~appliance.protocol.EmbedResult`), or the
:class:`~appliance.errors.ApplianceError` that ended it; the transport turns it into JSON.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.catalog import Catalog, ModelEntry
from appliance.config.schema import Config
from appliance.errors import (
    ApplianceError,
    BadRequest,
    Busy,
    RequestTimeout,
    UnknownModel,
    WorkerCrashed,
)
from appliance.generation.jobs import Reporter
from appliance.messages import Embed, Embedded, Exited, Failed, Infer, Inferred
from appliance.process.handle import ChildHandle, Spawn, WorkerProcess
from appliance.process.onnx_worker import OnnxWorker
from appliance.protocol import EmbedResult, TensorResult, request_id
from appliance.supervisor.guard import Guard
from appliance.tensors.arrays import describe_outputs, to_arrays
from appliance.tensors.embed_api import EmbedRequest

log = logging.getLogger(__name__)

Answer = TensorResult | EmbedResult | ApplianceError
Reply = Callable[[Answer], None]
RESTART_DELAY = 1.0


@dataclass
class _Pending:
    rid: str | int | None
    model_id: str
    reply: Reply
    transport: str | None  # None: asked by the appliance itself (the moderation filter), not by a requester
    deadline: float
    accepted: float


class InferencePool:
    def __init__(self, catalog: Catalog, config: Config, reporter: Reporter, guard: Guard,
                 spawn: Spawn = WorkerProcess) -> None:
        self.catalog = catalog
        self.config = config
        self.reporter = reporter
        self.guard = guard
        self.models = [e.id for e in catalog if e.backend == "onnx" and not e.embeds]  # the infer routes
        self.embedders = [e.id for e in catalog if e.embeds]  # the embedding routes
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._keys = itertools.count(1)
        self._spawn_child = spawn
        self._program = OnnxWorker(verify=config.models.verify)
        self._process: ChildHandle | None = None
        self._generation = 0
        self._closed = False
        self._timer = threading.Thread(target=self._expire, name="infer-timeouts", daemon=True)

    def start(self) -> None:
        if self.models or self.embedders:
            self._spawn()
            self._timer.start()

    def _spawn(self) -> None:
        self._generation += 1
        generation = self._generation
        self._process = self._spawn_child(self._program, generation,
                                          lambda message: self._on_message(generation, message))

    # -- requests ----------------------------------------------------------------------------------------------

    def submit(self, model_id: str, body: object, reply: Reply, transport: str) -> None:
        """Validate and queue one request; raises the error to answer at once."""
        if not isinstance(body, dict):
            raise BadRequest(f"request must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - {"id", "inputs", "reply_to"})
        if unknown:
            raise BadRequest(f"unknown field '{unknown[0]}'", param=unknown[0])
        if model_id not in self.models:
            raise UnknownModel(f"unknown tensor model '{model_id}' (available: {', '.join(self.models) or 'none'})",
                               param="model")
        arrays = to_arrays(body.get("inputs"), self.catalog.get(model_id).inputs)
        self.enqueue(model_id, request_id(body), arrays, reply, transport)

    def embedder(self, model: str | None) -> str:
        """The catalog id of the embedder a request names (None: the first one), or UnknownModel."""
        if model is None and self.embedders:
            return self.embedders[0]
        if model is None or model not in self.embedders:
            raise UnknownModel(f"unknown embedding model '{model}' (available: {', '.join(self.embedders) or 'none'})",
                               param="model")
        return model

    def embed(self, request: EmbedRequest, reply: Reply, transport: str) -> None:
        """Queue an embedding request (already checked, tensors/embed_api.py); raises the error to answer at once.
        The ONNX worker tokenizes it, so an over-long text comes back as a BadRequest answer."""
        self._queue(self.embedder(request.model), request.id, reply, transport,
                    lambda key, entry: Embed(key, entry, request.texts, request.truncate))

    def enqueue(self, model_id: str, rid: str | int | None, arrays: dict[str, Any], reply: Reply,
                transport: str | None) -> None:
        """Queue validated arrays for a tensor model; raises the error to answer at once. With ``transport`` None
        (the moderation filter) the request counts in no metric: the generate request it serves does."""
        self._queue(model_id, rid, reply, transport, lambda key, entry: Infer(key, entry, arrays))

    def _queue(self, model_id: str, rid: str | int | None, reply: Reply, transport: str | None,
               make: Callable[[int, ModelEntry], Infer | Embed]) -> None:
        entry = self.catalog.get(model_id)
        c = self.guard.conditions
        if c.thermal == "hard" or c.memory == "critical":
            raise Busy(c.thermal_reason if c.thermal == "hard" else c.memory_reason)
        now = time.monotonic()
        pending = _Pending(rid, model_id, reply, transport, now + self.config.worker.request_timeout, now)
        with self._lock:
            if self._closed or self._process is None:
                raise Busy("tensor inference is not running")
            if len(self._pending) > self.config.worker.max_queue:
                raise Busy(f"the inference queue is full ({self.config.worker.max_queue} waiting); try again later")
            key = next(self._keys)
            self._pending[key] = pending
            process = self._process
        if not process.send(make(key, entry)):
            self._answer(key, WorkerCrashed("the ONNX worker is restarting"))

    # -- results -----------------------------------------------------------------------------------------------

    def _on_message(self, generation: int, message: object) -> None:
        if generation != self._generation:
            return
        match message:
            case Inferred(key=key, outputs=outputs, milliseconds=ms):
                with self._lock:
                    pending = self._pending.get(key)
                if pending is not None:
                    entry = self.catalog.get(pending.model_id)
                    self._answer(key, TensorResult(pending.rid, pending.model_id,
                                                   describe_outputs(outputs, entry.outputs), ms))
            case Embedded(key=key, vectors=vectors, tokens=tokens, milliseconds=ms):
                with self._lock:
                    pending = self._pending.get(key)
                if pending is not None:
                    self._answer(key, EmbedResult(pending.rid, pending.model_id, vectors, tokens, ms))
            case Failed(key=key, error=error):
                self._answer(key, error)
            case Exited(code=code):
                self._on_exit(code)

    def _on_exit(self, code: int | None) -> None:
        if self._closed:
            return
        log.error("the ONNX worker exited (code %s); restarting it", code)
        with self._lock:
            keys = list(self._pending)
        for key in keys:
            self._answer(key, WorkerCrashed(f"the ONNX worker died (exit code {code}) with this request"))
        time.sleep(RESTART_DELAY)
        if not self._closed:
            self._spawn()

    def _answer(self, key: int, answer: Answer) -> None:
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.transport is not None:
            error = answer if isinstance(answer, ApplianceError) else None
            self.reporter.record_outcome(pending.transport, pending.accepted, error)
        try:
            pending.reply(answer)
        except Exception:
            log.exception("reply sink failed")

    def _expire(self) -> None:
        while not self._closed:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                late = [k for k, p in self._pending.items() if p.deadline <= now]
            for key in late:
                self._answer(key, RequestTimeout("no result within worker.request_timeout"))

    def close(self) -> None:
        """Stop; requests still pending get no answer (MQTT redelivers them after a restart)."""
        self._closed = True
        if self._process is not None:
            self._process.close()
