"""The inference worker: a child process with one backend and one loaded model.

It runs apart from the transports so that a crash, an abort or an OOM kill inside the engine cannot take MQTT or
HTTP down. It answers the parent's messages (appliance/messages.py): Load, Unload, Generate, Cancel, Pause, Resume,
Throttle and Shutdown; every reply about a job carries the job's key.

Request text crosses the pipe but is never logged here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import ClassVar

from appliance import backends, catalog
from appliance.backends.base import (
    Backend,
    EngineSettings,
    GenerationEvent,
    GenerationTask,
    Piece,
    PromptProgress,
    SequenceBatch,
)
from appliance.catalog.entry import ModelEntry
from appliance.errors import ApplianceError, Internal, ModelError
from appliance.messages import (
    Cancel,
    Chunk,
    Done,
    Failed,
    Generate,
    Load,
    Loaded,
    LoadFailed,
    Pause,
    Progress,
    Ready,
    Resume,
    Shutdown,
    StepReport,
    Stopped,
    Throttle,
    Unload,
    Unloaded,
)
from appliance.protocol import Completion

log = logging.getLogger("appliance.worker")

PROGRESS_EVERY = 0.5  # seconds between liveness reports of a non-streamed generation
# What the pipe raises once the parent has closed it (a stop, a restart, a kill of the service) while a generation
# sends a piece or polls for a cancel. (A batch step neither sends nor polls: the batch loop does, outside its try.)
PARENT_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


@dataclass(frozen=True)
class LlmWorker:
    """The inference worker's program (appliance/process/bootstrap.py starts it)."""

    settings: EngineSettings
    verify: bool  # check each model's sha256 before loading it

    name: ClassVar[str] = "appliance-llm"
    oom_score_adj: ClassVar[int] = 800

    def serve(self, conn: Connection) -> None:
        _Child(conn, self.settings, self.verify).run()


class _Child:
    def __init__(self, conn: Connection, settings: EngineSettings, verify: bool) -> None:
        self.conn = conn
        self.settings = settings
        self.verify = verify
        self.backend: Backend | None = None
        self.loaded_id: str | None = None
        self.backlog: deque[object] = deque()  # messages that arrived while generating
        self.step_out: list[Progress | Chunk | Done | Failed] = []  # what a batch step produced, sent after it
        self.stopping = False
        self.paused = False
        self.threads = settings.threads
        self.token_delay = 0.0

    def run(self) -> None:
        self.conn.send(Ready(os.getpid()))
        while not self.stopping:
            message = self.backlog.popleft() if self.backlog else self.conn.recv()
            match message:
                case Load(entry=entry, slots=slots):
                    self._load(entry, slots)
                case Generate(key=key, task=task):
                    batch = self.backend.batch() if self.backend is not None else None
                    if batch is None:
                        self._generate(key, task)
                    else:
                        self._run_batch(batch, key, task)
                case Unload():
                    self._close_backend()
                    self.conn.send(Unloaded())
                case Shutdown():
                    self.stopping = True
                case _:
                    self._control(message)  # a Cancel for a job that is no longer running needs nothing
        self._close_backend()

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend, self.loaded_id = None, None

    def _control(self, message: object) -> bool:
        """Apply a Pause, Resume or Throttle; False for anything else."""
        match message:
            case Pause():
                self.paused = True
            case Resume():
                self.paused = False
            case Throttle(threads=threads, token_delay=delay):
                self.threads, self.token_delay = threads, delay
                if self.backend is not None:
                    self.backend.set_threads(threads)
            case _:
                return False
        return True

    def _load(self, entry: ModelEntry, slots: int) -> None:
        try:
            # the digest is checked while the current model still serves (the parent probed the file already)
            if self.verify:
                catalog.verify(entry)
            backend = backends.create(entry.backend, replace(self.settings, parallel=slots))
        except ApplianceError as exc:
            self.conn.send(LoadFailed(entry.id, exc, still_loaded=self.loaded_id))
            return
        self._close_backend()  # one model in memory at a time
        try:
            info = backend.load(entry)
            if self.threads != self.settings.threads:
                backend.set_threads(self.threads)
        except ApplianceError as exc:
            self.conn.send(LoadFailed(entry.id, exc))
            return
        except Exception as exc:  # an engine bug must be reported, not kill the worker silently
            log.exception("loading model %s failed", entry.id)
            self.conn.send(LoadFailed(entry.id, Internal(f"loading '{entry.id}' failed: {type(exc).__name__}")))
            return
        self.backend, self.loaded_id = backend, entry.id
        self.conn.send(Loaded(info))

    def _should_stop(self, key: int) -> bool:
        """Polled by the backend between batches and tokens: has the parent cancelled this job? Also where the
        generation pauses while the board is too hot, and rests ``token_delay`` while it is warm."""
        if self._drain(key):
            return True
        if self.token_delay:
            deadline = time.monotonic() + self.token_delay
            while (left := deadline - time.monotonic()) > 0:
                if self.conn.poll(left) and self._drain(key):  # a cancel or a pause arrived during the rest
                    return True
        return False

    def _drain(self, key: int) -> bool:
        """Handle the messages waiting (and block while paused); True when this job must stop."""
        while self.paused or self.conn.poll():
            message = self.conn.recv()  # blocks while paused: nothing runs until resume, cancel or shutdown
            match message:
                case Cancel(key=cancelled) if cancelled == key:
                    return True
                case Shutdown():
                    self.stopping = True
                    return True
                case Cancel():
                    pass  # for a job that already ended
                case _:
                    if not self._control(message):
                        self.backlog.append(message)
        return False

    def _generate(self, key: int, task: GenerationTask) -> None:
        if self.backend is None:
            self.conn.send(Failed(key, ModelError("no model is loaded")))
            return
        report, finished = _JobReport(self.conn.send, key, task.stream), False
        try:
            for event in self.backend.generate(task, lambda: self._should_stop(key)):
                finished = report.send(event) or finished
        except PARENT_GONE:
            raise  # not the engine's failure: nobody is left to tell (bootstrap.main ends the child quietly)
        except Exception as exc:
            self._fail(key, exc, "generation failed inside the engine")
            return
        if not finished:
            self.conn.send(Stopped(key))

    def _fail(self, key: int, exc: Exception, where: str) -> None:
        """Tell the parent a job failed: the engine's own refusal as it is, anything else logged (a bug) and sent
        as an engine failure."""
        if not isinstance(exc, ApplianceError):
            log.exception(where)
        self.conn.send(Failed(key, _engine_failure(exc)))

    # -- several requests at once (continuous batching) --------------------------------------------------------

    def _run_batch(self, batch: SequenceBatch, key: int, task: GenerationTask) -> None:
        """Step the batch while it holds requests; between steps, newcomers join and cancels leave (the parent
        sends a Generate whenever a slot is free, so the pipe is read after every step). What a step produced for
        its jobs goes to the parent as one message (StepReport), not one per sequence."""
        reports: dict[int, _JobReport] = {}
        self._join(batch, reports, key, task)
        while batch.keys and not self.stopping:
            try:
                events = batch.step()
            except Exception as exc:  # an engine bug fails what was in the batch, not the worker
                log.exception("a batched generation failed inside the engine")
                for failed in batch.keys:
                    batch.leave(failed)
                    self.conn.send(Failed(failed, _engine_failure(exc)))
                    reports.pop(failed, None)
                break
            for event in events:
                if reports[event.key].send(event.event):
                    del reports[event.key]  # it ended and has left the batch
            self._send_step()
            self._between_steps(batch, reports)
        for left in batch.keys:  # shutting down: what still ran stops, as a cancelled generation does
            batch.leave(left)
            self.conn.send(Stopped(left))

    def _join(self, batch: SequenceBatch, reports: dict[int, _JobReport], key: int, task: GenerationTask) -> None:
        try:
            batch.join(key, task)
        except Exception as exc:
            self._fail(key, exc, "a request could not join the batch")
            return
        reports[key] = _JobReport(self.step_out.append, key, task.stream)

    def _send_step(self) -> None:
        """Send what the last step produced: a lone message as it is, several in one StepReport."""
        out = self.step_out
        if len(out) == 1:
            self.conn.send(out[0])
        elif out:
            self.conn.send(StepReport(tuple(out)))
        out.clear()

    def _between_steps(self, batch: SequenceBatch, reports: dict[int, _JobReport]) -> None:
        """Read what the parent sent (blocking while paused), then rest ``token_delay`` while it is warm."""
        deadline = time.monotonic() + self.token_delay
        while not self.stopping:
            if not (self.paused or self.conn.poll(max(0.0, deadline - time.monotonic()))):
                return
            match self.conn.recv():
                case Generate(key=key, task=task):
                    self._join(batch, reports, key, task)
                case Cancel(key=key) if key in reports:
                    batch.leave(key)
                    del reports[key]
                    self.conn.send(Stopped(key))
                case Cancel():
                    pass  # for a job that already ended
                case Shutdown():
                    self.stopping = True
                case message:
                    if not self._control(message):
                        self.backlog.append(message)


class _JobReport:
    """Turns one job's events into messages for the parent: every piece when it streams, else a liveness report now
    and then. ``post`` sends a message, or keeps it for the batch step's StepReport."""

    def __init__(self, post: Callable[[Progress | Chunk | Done | Failed], None], key: int, stream: bool) -> None:
        self.post, self.key, self.stream = post, key, stream
        self.pieces, self.last_report = 0, time.monotonic()

    def send(self, event: GenerationEvent | ApplianceError) -> bool:
        """True when the job has ended (its Done or Failed is sent)."""
        match event:
            case Piece(text=text):
                self.pieces += 1
                if self.stream:
                    self.post(Chunk(self.key, self.pieces, text))
                elif time.monotonic() - self.last_report >= PROGRESS_EVERY:
                    # Without a stream, one small message a second is enough to show the worker is alive;
                    # a message per token would cost the parent CPU that the engine's threads need.
                    self.last_report = time.monotonic()
                    self.post(Progress(self.key, self.pieces, 0))
            case PromptProgress(done=done, total=total):
                self.post(Progress(self.key, done, total))
            case Completion():
                self.post(Done(self.key, event))
                return True
            case ApplianceError():
                self.post(Failed(self.key, event))
                return True
        return False


def _engine_failure(exc: Exception) -> ApplianceError:
    """What a job is told when the engine raised: its own ApplianceError, or an engine failure that names only the
    exception's type (the traceback goes to the worker's log)."""
    return exc if isinstance(exc, ApplianceError) else ModelError(f"the engine failed: {type(exc).__name__}")
