"""The request queue between the transports and the inference worker.

Transports call :meth:`Scheduler.submit` from their own threads; it answers at once (accepted, ``busy``,
``unknown_model``, ``model_error``) and never blocks. Everything else happens on one scheduler thread that owns the
queue and the worker: it starts and restarts the child process, loads models, runs one generation at a time, enforces
timeouts and cancellations, and hands pieces and results to each job's sink. Nothing else touches that state, so
there are no locks around it; the only shared numbers (how many jobs are outstanding, which models failed) sit
behind one small lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from appliance.backends.base import EngineSettings, GenerationTask
from appliance.catalog import Catalog
from appliance.config import Config
from appliance.errors import (
    ApplianceError,
    Busy,
    Cancelled,
    ModelError,
    RequestTimeout,
    UnknownModel,
    WorkerCrashed,
    error_from_code,
)
from appliance.metrics import Metrics
from appliance.protocol import Completion, GenerateRequest
from appliance.status import StatusBoard
from appliance.worker.lifecycle import WorkerSlot

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a job's output goes. Called on the scheduler thread; must not block."""

    def on_piece(self, job: Job, seq: int, text: str) -> None: ...
    def on_result(self, job: Job, completion: Completion) -> None: ...
    def on_error(self, job: Job, error: ApplianceError) -> None: ...
    def on_abandon(self, job: Job) -> None:
        """The appliance is shutting down before the job finished (MQTT leaves it unacked for redelivery)."""


@dataclass(eq=False)
class Job:
    key: int
    request: GenerateRequest
    model_id: str
    task: GenerationTask
    sink: Sink
    transport: str
    accepted: float
    deadline: float
    seq: int = 0
    started: float | None = None
    last_progress: float = 0.0
    stop_reason: ApplianceError | None = None  # set when a running job is being cancelled or timed out
    stop_deadline: float = 0.0
    finished: bool = False
    extra: dict = field(default_factory=dict)  # transport bookkeeping (e.g. MQTT message ids to ack)


class Scheduler:
    def __init__(self, catalog: Catalog, config: Config, status: StatusBoard, metrics: Metrics) -> None:
        self.catalog = catalog
        self.config = config
        self.status = status
        self.metrics = metrics
        self.default_model = config.models.default
        self._capacity = config.worker.max_queue + 1  # waiting + the one being generated
        self._lock = threading.Lock()
        self._outstanding = 0
        self._failed_models: dict[str, str] = {}
        self._accepting = True
        self._keys = itertools.count(1)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        settings = EngineSettings(threads=_threads(config.worker.threads), context_size=config.worker.context_size,
                                  batch_size=config.worker.batch_size, mmap=config.worker.mmap)
        self.worker = WorkerSlot(settings, config, metrics,
                                 post=lambda event: self._inbox.put(("worker", event)))
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerateRequest, sink: Sink, transport: str) -> Job:
        """Accept a request or raise at once; never waits for room in the queue."""
        model_id = request.model or self.default_model
        if model_id not in self.catalog or (model_id != self.default_model and not self.config.models.switch):
            available = self.catalog.ids if self.config.models.switch else [self.default_model]
            raise UnknownModel(f"unknown model '{model_id}' (available: {', '.join(available)})", param="model")
        with self._lock:
            if not self._accepting:
                raise Busy("the appliance is shutting down")
            if model_id in self._failed_models:
                raise ModelError(self._failed_models[model_id])
            if self._outstanding >= self._capacity:
                raise Busy(f"the queue is full ({self._capacity - 1} waiting); try again later")
            self._outstanding += 1
        params = request.params
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.config.worker.default_max_tokens)
        now = time.monotonic()
        job = Job(key=next(self._keys), request=request, model_id=model_id,
                  task=GenerationTask(prompt=request.prompt, messages=request.messages, params=params,
                                      stream=request.stream),
                  sink=sink, transport=transport, accepted=now, deadline=now + self.config.worker.request_timeout)
        self._inbox.put(("submit", job))
        return job

    def cancel(self, request_id: str | int) -> None:
        """Cancel every queued or running job with this request id (MQTT ``cancel`` topic)."""
        self._inbox.put(("cancel_id", request_id))

    def cancel_job(self, job: Job, error: ApplianceError | None = None) -> None:
        """Cancel one job (an HTTP client went away)."""
        self._inbox.put(("cancel_job", job, error or Cancelled("the client cancelled the request")))

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, abandon what is queued or running, stop the worker. Idempotent."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)
        self.worker.close()

    # -- scheduler thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        self.worker.start()
        while True:
            try:
                event = self._inbox.get(timeout=self._next_wakeup())
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    if event[0] == "stop":
                        break
                    self._handle(event)
                self._check_timers()
                self._dispatch()
                self._publish_status()
            except Exception:  # the scheduler must survive its own bugs; each one is logged with a traceback
                log.exception("scheduler error")
        for job in [*self._queue, *([self._running] if self._running else [])]:
            self._abandon(job)
        self._queue.clear()
        self._running = None

    def _next_wakeup(self) -> float:
        deadlines = [j.deadline for j in self._queue]
        if self._running is not None:
            deadlines.append(self._running.stop_deadline or self._running.deadline)
        deadlines.extend(self.worker.timers())
        if not deadlines:
            return 1.0
        return min(max(min(deadlines) - time.monotonic(), 0.005), 1.0)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "submit":
            self._queue.append(event[1])
            self.metrics.queue_depth.set(len(self._queue))
        elif kind == "cancel_id":
            for job in [j for j in self._queue if j.request.id == event[1]]:
                self._fail_queued(job, Cancelled(f"request {event[1]!r} was cancelled"))
            if self._running is not None and self._running.request.id == event[1]:
                self._stop_running(Cancelled(f"request {event[1]!r} was cancelled"))
        elif kind == "cancel_job":
            job, error = event[1], event[2]
            if job in self._queue:
                self._fail_queued(job, error)
            elif job is self._running:
                self._stop_running(error)
        elif kind == "worker":
            self._on_worker_event(event[1])

    def _on_worker_event(self, event: tuple) -> None:
        outcome = self.worker.on_event(event)
        if outcome is None:
            return
        what = outcome[0]
        job = self._running
        if what == "load_failed":
            model_id, message = outcome[1], outcome[2]
            with self._lock:
                self._failed_models[model_id] = message
            for queued in [j for j in self._queue if j.model_id == model_id]:
                self._fail_queued(queued, ModelError(message))
            return
        if job is None:
            return
        if what == "progress":
            job.last_progress = time.monotonic()
        elif what == "piece":
            job.last_progress = time.monotonic()
            job.seq += 1
            self._call(job.sink.on_piece, job, job.seq, outcome[1])
        elif what == "done":
            self._finish(job, result=outcome[1])
        elif what == "failed":
            self._finish(job, error=outcome[1])
        elif what == "cancelled":
            self._finish(job, error=job.stop_reason or Cancelled("the request was cancelled"))
        elif what == "crashed":
            self._finish(job, error=job.stop_reason or WorkerCrashed(
                f"the inference worker died ({outcome[1]}) while generating this request"))

    def _check_timers(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            waited = now - job.accepted
            self._fail_queued(job, RequestTimeout(f"no result within {waited:.0f} s (worker.request_timeout); "
                                                  f"the request was still queued"))
        job = self._running
        if job is not None:
            if job.stop_reason is None and job.deadline <= now:
                self._stop_running(RequestTimeout(f"no result within {now - job.accepted:.0f} s "
                                                  f"(worker.request_timeout)"))
            elif job.stop_reason is not None and job.stop_deadline <= now:
                log.warning("request did not stop within worker.cancel_grace; restarting the worker")
                self.worker.kill()
        self.worker.check_timers(now)

    def _dispatch(self) -> None:
        if self._running is not None or not self.worker.idle:
            return
        if not self._queue:
            if self.worker.loaded is None and self.default_model not in self._failed_models:
                self.worker.load(self.catalog.get(self.default_model))
            return
        job = self._queue[0]
        if job.model_id != self.worker.loaded:
            self.worker.load(self.catalog.get(job.model_id))
            return
        self._queue.popleft()
        self.metrics.queue_depth.set(len(self._queue))
        job.started = job.last_progress = time.monotonic()
        self._running = job
        self.metrics.running.set(1)
        self.worker.generate(job.key, job.task)

    def _stop_running(self, error: ApplianceError) -> None:
        job = self._running
        if job is None or job.stop_reason is not None:
            return
        job.stop_reason = error
        job.stop_deadline = time.monotonic() + self.config.worker.cancel_grace
        self.worker.cancel(job.key)

    def _fail_queued(self, job: Job, error: ApplianceError) -> None:
        self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._finish(job, error=error)

    def _finish(self, job: Job, *, result: Completion | None = None, error: ApplianceError | None = None) -> None:
        if job.finished:
            return
        job.finished = True
        if job is self._running:
            self._running = None
            self.metrics.running.set(0)
        with self._lock:
            self._outstanding -= 1
        elapsed = time.monotonic() - job.accepted
        self.metrics.duration.observe(elapsed)
        if result is not None:
            self.metrics.requests.labels(job.transport, "ok").inc()
            self.metrics.prompt_tokens.inc(result.usage.prompt_tokens)
            self.metrics.completion_tokens.inc(result.usage.completion_tokens)
            self.metrics.ttft.observe(result.ttft_ms / 1000.0)
            self.metrics.tokens_per_second.set(result.tokens_per_s)
            log.info("request %r done in %.2f s: %d prompt + %d completion tokens, ttft %.0f ms, %.1f tok/s, %s",
                     job.request.id, elapsed, result.usage.prompt_tokens, result.usage.completion_tokens,
                     result.ttft_ms, result.tokens_per_s, result.finish_reason)
            if self.config.logging.log_prompts:
                log.debug("request %r prompt=%r messages=%r completion=%r", job.request.id, job.request.prompt,
                          job.request.messages, result.text)
            self._call(job.sink.on_result, job, result)
        else:
            error = error if isinstance(error, ApplianceError) else error_from_code(*error)
            self.record_error(job.transport, error)
            log.info("request %r failed after %.2f s: %s", job.request.id, elapsed, error.code)
            self._call(job.sink.on_error, job, error)

    def record_error(self, transport: str, error: ApplianceError) -> None:
        """Count an error reply (also used by transports for errors raised before a job exists)."""
        self.metrics.requests.labels(transport, error.code).inc()
        self.metrics.errors.labels(error.code).inc()

    def _abandon(self, job: Job) -> None:
        if not job.finished:
            job.finished = True
            self._call(job.sink.on_abandon, job)

    @staticmethod
    def _call(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("reply sink failed")

    def _publish_status(self) -> None:
        if not self._accepting:
            return
        state, model, reason = self.worker.describe()
        if state == "ready":
            with self._lock:
                full = self._outstanding >= self._capacity
            if full:
                state, reason = "busy", f"queue full ({self._capacity - 1} waiting)"
        elif state == "idle":
            failed = self._failed_models.get(self.default_model)
            state, reason = ("degraded", failed) if failed else ("starting", "")
        self.status.set(state, model=model, reason=reason)


def _threads(configured: int) -> int:
    if configured > 0:
        return configured
    try:
        import psutil
        return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    except ImportError:
        import os
        return os.cpu_count() or 1
