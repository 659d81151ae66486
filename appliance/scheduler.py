"""The request queue between the transports and the inference worker.

Transports call :meth:`Scheduler.submit` from their own threads; it answers at once (accepted, ``busy``,
``unknown_model``, ``model_error``, ``memory``, ``thermal``) and never blocks. Everything else happens on one
scheduler thread that owns the queue and the worker: it starts and restarts the child process, admits and loads
models, runs one generation at a time, enforces timeouts, stalls and cancellations, applies the supervisor's
conditions (pause, throttle, unload) and hands pieces and results to each job's sink. Nothing else touches that
state, so there are no locks around it; the few numbers read from other threads sit behind one small lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from appliance import backends
from appliance.backends.base import EngineSettings, GenerationTask
from appliance.catalog import Catalog, licence_problem
from appliance.config.schema import Config
from appliance.errors import (
    ApplianceError,
    BadRequest,
    Busy,
    Cancelled,
    InsufficientMemory,
    ModelError,
    RequestTimeout,
    UnknownModel,
    WorkerCrashed,
    error_from_code,
)
from appliance.guard import Guard
from appliance.jobs import Job, Reporter, Sink
from appliance.metrics import Metrics
from appliance.policies import Conditions
from appliance.protocol import Completion, GenerateRequest
from appliance.status import StatusBoard
from appliance.worker.lifecycle import WorkerSlot

log = logging.getLogger(__name__)

__all__ = ["Job", "Scheduler", "Sink"]


class Scheduler:
    def __init__(self, catalog: Catalog, config: Config, status: StatusBoard, metrics: Metrics,
                 guard: Guard | None = None) -> None:
        self.catalog = catalog
        self.config = config
        self.status = status
        self.metrics = metrics
        self.guard = guard or Guard(config, lambda: None)
        self.reporter = Reporter(config, metrics)
        self.default_model = config.models.default
        self._capacity = config.worker.max_queue + 1  # waiting + the one being generated
        self._lock = threading.Lock()
        self._outstanding = 0
        self._failed_models: dict[str, ApplianceError] = {}  # models that will not load until a restart
        self._accepting = True
        self._keys = itertools.count(1)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._admission_problem = ""  # why the default model was refused, while it is
        self.heartbeat = time.monotonic()  # the watchdog checks that this loop keeps turning
        self.gate: Callable[[Job, Callable[[], None]], None] = lambda job, release: release()  # or moderation's
        self.threads = _threads(config.worker.threads)
        settings = EngineSettings(threads=self.threads, context_size=config.worker.context_size,
                                  batch_size=config.worker.batch_size, mmap=config.worker.mmap,
                                  rwkv_strategy=config.worker.rwkv_strategy)
        self.worker = WorkerSlot(settings, config, metrics, post=lambda event: self._inbox.put(("worker", event)))
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerateRequest, sink: Sink, transport: str) -> Job:
        """Accept a request or raise at once; never waits for room in the queue."""
        model_id = request.model or self.default_model
        if model_id not in self.catalog or (model_id != self.default_model and not self.config.models.switch):
            available = self.catalog.ids if self.config.models.switch else [self.default_model]
            raise UnknownModel(f"unknown model '{model_id}' (available: {', '.join(available)})", param="model")
        entry = self.catalog.get(model_id)
        if not entry.generates_text:
            raise BadRequest(f"model '{model_id}' is a {entry.backend} model: send it tensors on the infer topic or "
                             f"POST /v1/infer/{model_id}", param="model")
        problem = licence_problem(entry, self.config.models.allow_noncommercial)
        if problem:
            raise ModelError(problem, param="model")
        refusal = self.guard.refusal(request, model_id)
        if refusal is not None:
            raise refusal
        if self.worker.failure:
            raise WorkerCrashed(self.worker.failure)
        with self._lock:
            if not self._accepting:
                raise Busy("the appliance is shutting down")
            if model_id in self._failed_models:
                raise self._failed_models[model_id]
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
        self.gate(job, lambda: self._inbox.put(("submit", job)))  # moderation.py: returns at once
        return job

    def cancel(self, request_id: str | int) -> None:
        """Cancel every queued or running job with this request id (MQTT ``cancel`` topic)."""
        self._inbox.put(("cancel_id", request_id))

    def cancel_job(self, job: Job, error: ApplianceError | None = None) -> None:
        """Cancel one job (an HTTP client went away)."""
        self._inbox.put(("cancel_job", job, error or Cancelled("the client cancelled the request")))

    def set_conditions(self, conditions: Conditions) -> None:
        """The supervisor's view of memory and temperature changed."""
        self._inbox.put(("conditions", conditions))

    def record_error(self, transport: str, error: ApplianceError) -> None:
        self.reporter.record_error(transport, error)

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
            self.heartbeat = time.monotonic()
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
            self.reporter.abandon(job)
        self._queue.clear()
        self._running = None

    def _next_wakeup(self) -> float:
        deadlines = [j.deadline for j in self._queue]
        job = self._running
        if job is not None:
            deadlines.append(job.stop_deadline or job.deadline)
            if not self.guard.paused:
                deadlines.append(job.last_progress + self.config.worker.stall_timeout)
        deadlines.extend(self.worker.timers())
        if self.guard.refused_until(self.default_model):
            deadlines.append(self.guard.refused_until(self.default_model))
        if not deadlines:
            return 1.0
        return min(max(min(deadlines) - time.monotonic(), 0.005), 1.0)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "submit":
            self._queue.append(event[1])
            self.metrics.queue_depth.set(len(self._queue))
            if event[1].stop_reason is not None:  # refused by the moderation filter, or cancelled while it looked
                self._fail_queued(event[1], event[1].stop_reason)
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
            else:  # still with the moderation filter: refused once it hands the job over
                job.stop_reason = job.stop_reason or error
        elif kind == "conditions":
            self._apply_conditions(event[1])
        elif kind == "worker":
            self._on_worker_event(event[1])

    def _apply_conditions(self, conditions: Conditions) -> None:
        old = self.guard.update(conditions)
        if conditions.memory == "critical" and old.memory != "critical" and self._running is not None:
            self._stop_running(InsufficientMemory(f"{conditions.memory_reason}; the generation was stopped and "
                                                  f"the model unloaded until memory recovers"))
        if self.guard.paused != (old.thermal == "hard") and self._running is not None:
            self._running.last_progress = time.monotonic()  # a pause is not a stall
        self.worker.pause(self.guard.paused)
        self.worker.throttle(*self.guard.throttle(self.threads))

    def _on_worker_event(self, event: tuple) -> None:
        outcome = self.worker.on_event(event)
        if outcome is None:
            return
        what = outcome[0]
        job = self._running
        if what == "load_failed":
            self._model_failed(outcome[1], error_from_code(outcome[2], outcome[3], "model"))
        elif job is None:
            pass
        elif what == "progress":
            job.last_progress = time.monotonic()
        elif what == "piece":
            job.last_progress = time.monotonic()
            job.seq += 1
            try:
                job.sink.on_piece(job, job.seq, outcome[1])
            except Exception:
                log.exception("reply sink failed")
        elif what == "done":
            self._finish(job, result=outcome[1])
        elif what == "failed":
            self._finish(job, error=error_from_code(*outcome[1]))
        elif what == "cancelled":
            self._finish(job, error=job.stop_reason or Cancelled("the request was cancelled"))
        elif what == "crashed":
            self._finish(job, error=job.stop_reason or WorkerCrashed(
                f"the inference worker died ({outcome[1]}) while generating this request"))
        if self.worker.failure:
            for queued in list(self._queue):
                self._fail_queued(queued, WorkerCrashed(self.worker.failure))

    def _check_timers(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            waited = now - job.accepted
            self._fail_queued(job, RequestTimeout(f"no result within {waited:.0f} s (worker.request_timeout); "
                                                  f"the request was still queued"))
        job = self._running
        if job is not None:
            stall = self.config.worker.stall_timeout
            if job.stop_reason is None and job.deadline <= now:
                self._stop_running(RequestTimeout(f"no result within {now - job.accepted:.0f} s "
                                                  f"(worker.request_timeout)"))
            elif job.stop_reason is None and not self.guard.paused and now - job.last_progress > stall:
                log.error("no progress for %.0f s: the worker is stuck; killing it", now - job.last_progress)
                job.stop_reason = RequestTimeout(f"the worker made no progress for {stall:g} s "
                                                 f"(worker.stall_timeout) and was restarted")
                job.stop_deadline = now
                self.worker.kill()
            elif job.stop_reason is not None and job.stop_deadline <= now:
                log.warning("request did not stop within worker.cancel_grace; restarting the worker")
                self.worker.kill()
        self.worker.check_timers(now)

    def _dispatch(self) -> None:
        if self._running is not None or not self.worker.idle:
            return
        if self.guard.hold is not None:
            if self.guard.conditions.memory == "critical" and self.worker.loaded is not None:
                self.worker.unload()
            return
        if self._queue:
            target = self._queue[0].model_id
        elif self.worker.loaded is None and self.default_model not in self._failed_models:
            target = self.default_model
            if self.guard.refused_until(target) > time.monotonic():
                return
        else:
            return
        if target != self.worker.loaded:
            self._load(target)
            return
        job = self._queue.popleft()
        self.metrics.queue_depth.set(len(self._queue))
        capped = self.guard.max_tokens(job.task.params.max_tokens)
        if capped != job.task.params.max_tokens:
            job.task = replace(job.task, params=replace(job.task.params, max_tokens=capped))
        job.started = job.last_progress = time.monotonic()
        self._running = job
        self.metrics.running.set(1)
        self.worker.generate(job.key, job.task)

    def _load(self, model_id: str) -> None:
        entry = self.catalog.get(model_id)
        problem = licence_problem(entry, self.config.models.allow_noncommercial)
        if problem:
            self._model_failed(model_id, ModelError(problem, param="model"))
            return
        try:
            backends.precheck(entry)  # cheap refusals first, while the loaded model still serves
            self.guard.admit(entry, self.worker.loaded_entry)
        except InsufficientMemory as exc:  # may fit later: tried again after a while or a change of memory level
            log.error("%s", exc.message)
            if model_id == self.default_model:
                self._admission_problem = exc.message
            self._fail_queued_for(model_id, exc)
            return
        except ModelError as exc:  # not a file its engine can run: it will not get better by itself
            self._model_failed(model_id, exc)
            return
        if model_id == self.default_model:
            self._admission_problem = ""
        self.worker.load(entry)

    def _model_failed(self, model_id: str, error: ApplianceError) -> None:
        """The model cannot be loaded (bad file, licence, architecture): refuse it until the service restarts."""
        log.error("%s", error.message)
        with self._lock:
            self._failed_models[model_id] = error
        self._fail_queued_for(model_id, error)

    def _stop_running(self, error: ApplianceError) -> None:
        job = self._running
        if job is None or job.stop_reason is not None:
            return
        job.stop_reason = error
        job.stop_deadline = time.monotonic() + self.config.worker.cancel_grace
        self.worker.cancel(job.key)

    def _fail_queued_for(self, model_id: str, error: ApplianceError) -> None:
        for job in [j for j in self._queue if j.model_id == model_id]:
            self._fail_queued(job, error)

    def _fail_queued(self, job: Job, error: ApplianceError) -> None:
        self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._finish(job, error=error)

    def _finish(self, job: Job, *, result: Completion | None = None, error: ApplianceError | None = None) -> None:
        if job.finished:
            return
        if job is self._running:
            self._running = None
            self.metrics.running.set(0)
        with self._lock:
            self._outstanding -= 1
        self.reporter.finish(job, result, error)

    @property
    def default_model_failure(self) -> str | None:
        """Why the default model will not load until a restart; None while it may (read from any thread)."""
        failed = self._failed_models.get(self.default_model)
        return failed.message if failed else None

    def _publish_status(self) -> None:
        if not self._accepting:
            return
        state, model, reason = self.worker.describe()
        if state != "error" and self.guard.hold is not None:
            state, reason = "degraded", self.guard.hold
        elif state == "ready":
            with self._lock:
                full = self._outstanding >= self._capacity
            if full:
                state, reason = "busy", f"queue full ({self._capacity - 1} waiting)"
        elif state == "idle":
            failed = self._failed_models.get(self.default_model)
            problem = failed.message if failed else self._admission_problem
            state, reason = ("degraded", problem) if problem else ("starting", "")
        self.status.set(state, model=model, reason=reason, warnings=self.guard.conditions.status_warnings)


def _threads(configured: int) -> int:
    if configured > 0:
        return configured
    try:
        import psutil
        return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    except ImportError:
        import os
        return os.cpu_count() or 1
