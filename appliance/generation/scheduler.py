"""The request queue between the transports and the inference worker.

Transports call :meth:`Scheduler.submit` from their own threads; it answers at once (accepted, ``busy``,
``unknown_model``, ``model_error``, ``memory``, ``thermal``) and never blocks. Everything else happens on one
scheduler thread that owns the queue and the worker: it starts and restarts the child process, admits and loads
models, starts jobs on the worker as it has room, enforces timeouts, stalls and cancellations, applies the
supervisor's conditions (pause, throttle, unload) and hands chunks and results to each job's sink. Nothing else
touches that state, so there are no locks around it; the few numbers read from other threads sit behind one small
lock. Other threads reach the scheduler thread through its inbox, in the small message types of commands.py.
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
from appliance.backends.base import EngineSettings
from appliance.catalog import Catalog, licence_problem
from appliance.config.schema import Config
from appliance.errors import (
    ApplianceError,
    Busy,
    Cancelled,
    InsufficientMemory,
    ModelError,
    QueueFull,
    RequestTimeout,
    WorkerCrashed,
)
from appliance.generation.acceptance import generation_task, requested_model
from appliance.generation.commands import (
    CancelJob,
    CancelRequest,
    Command,
    Moderating,
    NewConditions,
    Stop,
    Submit,
)
from appliance.generation.jobs import Job, Reporter, Requester, Sink, deliver
from appliance.generation.slot import FromWorker, JobUpdate, WorkerSlot
from appliance.messages import Chunk, Crashed, Done, Failed, LoadFailed, Progress, Stopped
from appliance.metrics import Metrics
from appliance.process.handle import Spawn, WorkerProcess
from appliance.protocol import Completion, GenerateRequest
from appliance.status import StatusBoard
from appliance.supervisor.guard import Guard
from appliance.supervisor.policies import Conditions

log = logging.getLogger(__name__)

__all__ = ["Job", "Requester", "Scheduler", "Sink"]


class Scheduler:
    def __init__(self, catalog: Catalog, config: Config, status: StatusBoard, metrics: Metrics,
                 guard: Guard | None = None, spawn: Spawn = WorkerProcess) -> None:
        self.catalog = catalog
        self.config = config
        self.status = status
        self.metrics = metrics
        self.guard = guard or Guard(config, lambda: None)
        self.reporter = Reporter(config, metrics)
        self.default_model = config.models.default
        self._capacity = config.worker.max_queue + config.worker.parallel  # waiting + those being generated
        self._lock = threading.Lock()
        self._outstanding = 0
        self._failed_models: dict[str, ApplianceError] = {}  # models that will not load until a restart
        self._accepting = True
        self._keys = itertools.count(1)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._queue: deque[Job] = deque()
        self._moderating: dict[int, Job] = {}  # accepted, not yet through the moderation gate
        self._admission_problem = ""  # why the default model was refused, while it is
        self.heartbeat = time.monotonic()  # the watchdog checks that this loop keeps turning
        self.gate: Callable[[Job, Callable[[], None]], None] = lambda job, release: release()  # or moderation's
        settings = EngineSettings.from_config(config.worker)
        self.threads = settings.threads
        self.worker = WorkerSlot(settings, config, metrics, post=self._inbox.put, spawn=spawn)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerateRequest, sink: Sink, transport: str,
               requester: Requester | None = None) -> Job:
        """Accept a request or raise at once; never waits for room in the queue. Only the same ``requester`` may
        cancel it by id (None: only :meth:`cancel_job` can)."""
        entry = requested_model(request, self.catalog, self.config)
        model_id = entry.id
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
                raise QueueFull(f"the queue is full ({self.config.worker.max_queue} waiting); try again later")
            self._outstanding += 1
        now = time.monotonic()
        job = Job(key=next(self._keys), request=request, model_id=model_id,
                  task=generation_task(request, entry, self.config), sink=sink, transport=transport, accepted=now,
                  deadline=now + self.config.worker.request_timeout, requester=requester)
        self._inbox.put(Moderating(job))  # before the gate can release it: the inbox keeps the order
        self.gate(job, lambda: self._inbox.put(Submit(job)))  # moderation.py: returns at once
        return job

    def cancel(self, request_id: str | int, requester: Requester) -> None:
        """Cancel every job with this request id sent by this requester, being moderated, queued or running (MQTT
        ``cancel`` topic); another requester's job with the same id is left alone."""
        self._inbox.put(CancelRequest(request_id, requester))

    def cancel_job(self, job: Job, error: ApplianceError | None = None) -> None:
        """Cancel one job (an HTTP client went away)."""
        self._inbox.put(CancelJob(job, error or Cancelled("the client cancelled the request")))

    def set_conditions(self, conditions: Conditions) -> None:
        """The supervisor's view of memory and temperature changed."""
        self._inbox.put(NewConditions(conditions))

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
            self._inbox.put(Stop())
            self._thread.join(timeout)
        self.worker.close()

    # -- scheduler thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        self.worker.start()
        while True:
            self.heartbeat = time.monotonic()
            try:
                command: Command | None = self._inbox.get(timeout=self._next_wakeup())
            except queue.Empty:
                command = None
            try:
                if isinstance(command, Stop):
                    break
                if command is not None:
                    self._handle(command)
                self._check_timers()
                self._dispatch()
                self._publish_status()
            except Exception:  # the scheduler must survive its own bugs; each one is logged with a traceback
                log.exception("scheduler error")
        for job in [*self._moderating.values(), *self._queue, *self.worker.running.values()]:
            self.reporter.abandon(job)
        self._queue.clear()
        self._moderating.clear()

    def _next_wakeup(self) -> float:
        deadlines = [j.deadline for j in self._queue]
        for job in self.worker.running.values():
            deadlines.append(job.stop_deadline or job.deadline)
            if not self.guard.paused:
                deadlines.append(job.last_progress + self.config.worker.stall_timeout)
        deadlines.extend(self.worker.timers())
        if self.guard.refused_until(self.default_model):
            deadlines.append(self.guard.refused_until(self.default_model))
        if not deadlines:
            return 1.0
        return min(max(min(deadlines) - time.monotonic(), 0.005), 1.0)

    def _handle(self, command: Command) -> None:
        match command:
            case Moderating(job=job):
                self._moderating[job.key] = job
            case Submit(job=job):
                self._moderating.pop(job.key, None)
                if job.finished:  # cancelled while the moderation filter looked: already answered
                    return
                self._queue.append(job)
                self.metrics.queue_depth.set(len(self._queue))
                if job.stop_reason is not None:  # refused by the moderation filter
                    self._fail_queued(job, job.stop_reason)
            case CancelRequest(request_id=rid, requester=requester):
                for job in self._jobs():
                    if job.request.id == rid and job.requester == requester:
                        self._cancel(job, Cancelled(f"request {rid!r} was cancelled"))
            case CancelJob(job=job, error=error):
                self._cancel(job, error)
            case NewConditions(conditions=conditions):
                self._apply_conditions(conditions)
            case FromWorker():
                self._on_worker_message(command)

    def _jobs(self) -> list[Job]:
        """Every unfinished job, at whatever stage: with the moderation gate, queued or running."""
        return [*self._moderating.values(), *self._queue, *self.worker.running.values()]

    def _cancel(self, job: Job, error: ApplianceError) -> None:
        """Stop one job wherever it is; no token is generated for one that has not started."""
        if job in self._queue:
            self._fail_queued(job, error)
        elif self.worker.running.get(job.key) is job:
            self._stop_running(job, error)
        elif self._moderating.pop(job.key, None) is job:  # answered now; the gate's Submit for it is dropped
            self._finish(job, error)

    def _apply_conditions(self, conditions: Conditions) -> None:
        old = self.guard.update(conditions)
        if conditions.memory == "critical" and old.memory != "critical":
            for job in list(self.worker.running.values()):
                self._stop_running(job, InsufficientMemory(f"{conditions.memory_reason}; the generation was "
                                                           f"stopped and the model unloaded until memory recovers"))
        if self.guard.paused != (old.thermal == "hard"):
            for job in self.worker.running.values():
                job.last_progress = time.monotonic()  # a pause is not a stall
        self.worker.pause(self.guard.paused)
        self.worker.throttle(*self.guard.throttle(self.threads))

    def _on_worker_message(self, message: FromWorker) -> None:
        for outcome in self.worker.on_message(message):
            match outcome:
                case LoadFailed(model_id=model_id, error=error):
                    error.param = "model"
                    self._model_failed(model_id, error)
                case JobUpdate(job=job, event=Progress()):
                    job.last_progress = time.monotonic()
                case JobUpdate(job=job, event=Chunk() as chunk):
                    job.last_progress = time.monotonic()
                    deliver(job, chunk)
                case JobUpdate(job=job, event=Done(completion=completion)):
                    self._finish(job, completion)
                case JobUpdate(job=job, event=Failed(error=error)):
                    self._finish(job, error)
                case JobUpdate(job=job, event=Stopped()):
                    self._finish(job, job.stop_reason or Cancelled("the request was cancelled"))
                case JobUpdate(job=job, event=Crashed(how=how)):
                    self._finish(job, job.stop_reason or WorkerCrashed(
                        f"the inference worker died ({how}) while generating this request"))
        if self.worker.failure:
            for queued in list(self._queue):
                self._fail_queued(queued, WorkerCrashed(self.worker.failure))

    def _check_timers(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            waited = now - job.accepted
            self._fail_queued(job, RequestTimeout(f"no result within {waited:.0f} s (worker.request_timeout); "
                                                  f"the request was still queued"))
        stall = self.config.worker.stall_timeout
        for job in list(self.worker.running.values()):
            if job.stop_reason is None and job.deadline <= now:
                self._stop_running(job, RequestTimeout(f"no result within {now - job.accepted:.0f} s "
                                                       f"(worker.request_timeout)"))
            elif job.stop_reason is None and not self.guard.paused and now - job.last_progress > stall:
                log.error("no progress for %.0f s: the worker is stuck; killing it", now - job.last_progress)
                job.stop_reason = RequestTimeout(f"the worker made no progress for {stall:g} s "
                                                 f"(worker.stall_timeout) and was restarted")
                job.stop_deadline = now
                self.worker.kill()
            elif job.stop_reason is not None and job.stop_deadline <= now:
                log.warning("request did not stop within worker.cancel_grace; restarting the worker")
                self.worker.kill(deliberate="a request did not stop within worker.cancel_grace")
        self.worker.check_timers(now)

    def _dispatch(self) -> None:
        """Load what the queue needs and start jobs while the worker has room."""
        while self.worker.settled:
            if self.guard.hold is not None:
                critical = self.guard.conditions.memory == "critical"
                if critical and self.worker.loaded is not None and not self.worker.running:
                    self.worker.unload()
                return
            if self._queue:
                target = self._queue[0].model_id
            elif self.worker.loaded is None and not self.worker.running \
                    and self.default_model not in self._failed_models:
                target = self.default_model
                if self.guard.refused_until(target) > time.monotonic():
                    return
            else:
                return
            if target != self.worker.loaded:
                if not self.worker.running:  # another model: once what runs has finished
                    self._load(target)
                return
            # under memory pressure fewer requests run at once, before any is refused (supervisor/guard.py)
            self.worker.slot_limit = self.guard.slots(self.config.worker.parallel)
            if not self.worker.free:
                return
            self._start(self._queue.popleft())

    def _start(self, job: Job) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        requested = job.task.params.max_tokens
        capped = self.guard.max_tokens(requested) if requested is not None else None
        if capped != requested:
            job.task = replace(job.task, params=replace(job.task.params, max_tokens=capped))
        job.last_progress = time.monotonic()
        self.worker.generate(job)
        self.metrics.running.set(len(self.worker.running))

    def _load(self, model_id: str) -> None:
        entry = self.catalog.get(model_id)
        problem = licence_problem(entry, self.config.models.allow_noncommercial)
        if problem:
            self._model_failed(model_id, ModelError(problem, param="model"))
            return
        try:
            backends.probe_for(entry.backend).check(entry)  # cheap refusals first, while the loaded model still serves
            slots = self.guard.admit(entry, self.worker.loaded_entry)
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
        self.worker.load(entry, slots)

    def _model_failed(self, model_id: str, error: ApplianceError) -> None:
        """The model cannot be loaded (bad file, licence, architecture): refuse it until the service restarts."""
        log.error("%s", error.message)
        with self._lock:
            self._failed_models[model_id] = error
        self._fail_queued_for(model_id, error)

    def _stop_running(self, job: Job, error: ApplianceError) -> None:
        if job.stop_reason is not None:
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
        self._finish(job, error)

    def _finish(self, job: Job, result: Completion | ApplianceError) -> None:
        if job.finished:
            return
        self.metrics.running.set(len(self.worker.running))
        with self._lock:
            self._outstanding -= 1
        self.reporter.finish(job, result)

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
                state, reason = "busy", f"queue full ({self.config.worker.max_queue} waiting)"
        elif state == "idle":
            failed = self._failed_models.get(self.default_model)
            problem = failed.message if failed else self._admission_problem
            state, reason = ("degraded", problem) if problem else ("starting", "")
        self.status.set(state, model=model, reason=reason, warnings=self.guard.conditions.status_warnings)

