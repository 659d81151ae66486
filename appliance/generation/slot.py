"""The inference worker's life as the scheduler sees it: spawn, load, generate, crash, back off, restart.

:class:`WorkerSlot` holds the current worker process and the jobs running on it (a mapping by job key: the worker
runs ``capacity`` of them at once). It is used only from the scheduler thread. The worker's messages reach it
through the scheduler's inbox, tagged with the process generation so that messages from a process that was
already replaced are dropped; :meth:`WorkerSlot.on_message` turns them into what the scheduler acts on: a
:class:`JobUpdate` for a job, or a :class:`~appliance.messages.LoadFailed`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable

from appliance import messages
from appliance.backends.base import EngineSettings, ModelInfo
from appliance.catalog.entry import ModelEntry
from appliance.config import Config
from appliance.errors import ModelError
from appliance.generation.jobs import Job
from appliance.messages import message
from appliance.metrics import Metrics
from appliance.process.handle import ChildHandle, Spawn, WorkerProcess
from appliance.process.llm_worker import LlmWorker

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
LOAD_CRASHES_BEFORE_GIVING_UP = 3


@message
class FromWorker:
    """A message from worker process number ``generation``, as it waits in the scheduler's inbox."""

    generation: int
    message: messages.WorkerMessage


@message
class JobUpdate:
    """What happened to a running job: Progress, Chunk, Done, Failed, Stopped or Crashed (appliance/messages.py)."""

    job: Job
    event: messages.Progress | messages.Chunk | messages.Done | messages.Failed | messages.Stopped | messages.Crashed


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@message
class _Model:
    """What the worker has loaded."""

    entry: ModelEntry
    info: ModelInfo


class WorkerSlot:
    def __init__(self, settings: EngineSettings, config: Config, metrics: Metrics,
                 post: Callable[[FromWorker], None], spawn: Spawn = WorkerProcess) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self._post = post
        self._spawn = spawn
        self._program = LlmWorker(settings, verify=config.models.verify)
        self._process: ChildHandle | None = None
        self._generation = 0
        self._state = "down"  # down | starting | ready | loading | unloading | failed
        #: the jobs the worker is generating now, by key
        self.running: dict[int, Job] = {}
        self._model: _Model | None = None
        self._before_load: _Model | None = None  # kept if the next load is refused before it unloads this one
        self._loading: ModelEntry | None = None
        self._load_deadline = 0.0
        self._restart_at: float | None = None
        self._backoff = BACKOFF_FIRST
        self._load_crashes: dict[str, int] = {}
        self._last_crash = ""
        self._crashes: deque[float] = deque()
        self.failure = ""  # set when the worker crashed too often; it stays down for worker.restart_window
        self._deliberate = ""  # why the worker is being killed on purpose (not a crash), until it has exited
        self._kill_sent = False
        self._closing = False
        self._held_model = False  # this process has loaded a model (the next load gets a fresh process)
        self._pending_load: ModelEntry | None = None
        self._slots = 1  # what the last Load asked for (worker.parallel, or fewer when memory is short)
        #: the most jobs to run at once now, whatever the model could (the guard lowers it under memory pressure)
        self.slot_limit = settings.parallel
        self._throttle = (settings.threads, 0.0)
        self._paused = False

    # -- what the scheduler reads ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def settled(self) -> bool:
        """The process is up and no load or unload is in flight."""
        return self._state == "ready"

    @property
    def capacity(self) -> int:
        """Jobs the loaded model generates at once (1 for engines that do not batch), within ``slot_limit``."""
        slots = self._model.info.slots if self._model is not None else 1
        return max(1, min(slots, self.slot_limit))

    @property
    def free(self) -> int:
        """How many more jobs the worker can start now."""
        return max(0, self.capacity - len(self.running)) if self.settled else 0

    @property
    def loaded(self) -> str | None:
        return self._model.entry.id if self._model else None

    @property
    def loaded_entry(self) -> ModelEntry | None:
        return self._model.entry if self._model else None

    @property
    def throttled(self) -> tuple[int, float]:
        return self._throttle

    # -- commands ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._generation += 1
        generation = self._generation
        self._state = "starting"
        self._restart_at, self._kill_sent = None, False
        self._process = self._spawn(self._program, generation,
                                    lambda message: self._post(FromWorker(generation, message)))
        log.info("worker process %s started", self._process.pid)

    def _send(self, message: object) -> None:
        if self._process is not None:
            self._process.send(message)

    def load(self, entry: ModelEntry, slots: int = 1) -> None:
        """Load a model; a process that already held another model is replaced by a fresh one first.

        A fresh process gives the previous model's memory back to the system (a freed heap is not always
        returned) and leaves no engine state behind: RWKV-7 in llama.cpp 0.3.36 computed NaNs after other
        architectures had been loaded in the same process.
        """
        log.info("loading model %s (%s)", entry.id, entry.path.name)
        self._state, self._loading, self._slots = "loading", entry, slots
        self._before_load, self._model = self._model, None
        self._load_deadline = time.monotonic() + self.config.worker.load_timeout
        if self._held_model:
            self._before_load = None
            if self._process is not None:
                self._process.close()  # its exit is of an older generation: not a crash
            self.start()
            self._state, self._pending_load = "loading", entry  # sent once the new process is ready
            return
        self._held_model = True
        self._send(messages.Load(entry, slots))

    def unload(self) -> None:
        log.info("unloading model %s", self.loaded)
        self._state = "unloading"
        self._send(messages.Unload())

    def pause(self, paused: bool) -> None:
        """Hold (or release) the running generations between tokens; also applies to later ones."""
        if paused != self._paused:
            self._paused = paused
            self._send(messages.Pause() if paused else messages.Resume())

    def throttle(self, threads: int, token_delay: float) -> None:
        if (threads, token_delay) != self._throttle:
            log.info("worker throttle: %d threads, %.3f s between tokens", threads, token_delay)
            self._throttle = (threads, token_delay)
            self._send(messages.Throttle(threads, token_delay))

    def generate(self, job: Job) -> None:
        self.running[job.key] = job
        self._send(messages.Generate(job.key, job.task))

    def cancel(self, key: int) -> None:
        if key in self.running:
            self._send(messages.Cancel(key))

    def kill(self, *, deliberate: str = "") -> None:
        """Kill the worker. ``deliberate`` names why when it is no fault of the worker (a request that did not stop
        within worker.cancel_grace): such a stop restarts it at once and never counts toward max_restarts."""
        if self._process is not None and not self._kill_sent:  # the first reason given is the one that counts
            self._kill_sent, self._deliberate = True, deliberate
            self._process.kill()

    def close(self) -> None:
        self._closing = True
        if self._process is not None:
            self._process.close()
            self._process = None

    # -- timers ------------------------------------------------------------------------------------------------

    def timers(self) -> list[float]:
        out = [self._restart_at] if self._restart_at is not None else []
        if self._state == "loading":
            out.append(self._load_deadline)
        return out

    def check_timers(self, now: float) -> None:
        if self._state in ("down", "failed") and self._restart_at is not None and now >= self._restart_at:
            if self._state == "failed":  # the back-off after too many crashes is over: try again, from a clean slate
                log.warning("retrying the inference worker after %g s in error", self.config.worker.restart_window)
                self.failure, self._backoff = "", BACKOFF_FIRST
                self._crashes.clear()
            self.start()
        elif self._state == "loading" and now >= self._load_deadline:
            log.error("model load took longer than worker.load_timeout; killing the worker")
            self.kill()

    # -- messages ----------------------------------------------------------------------------------------------

    def on_message(self, tagged: FromWorker) -> list[JobUpdate | messages.LoadFailed]:
        if tagged.generation != self._generation or self._closing:
            return []
        match tagged.message:
            case messages.Ready():
                self._on_ready()
            case messages.Unloaded():
                self._state, self._model = "ready", None
            case messages.Loaded(info=info):
                self._on_loaded(info)
            case messages.LoadFailed() as failed:
                return [self._on_load_failed(failed)]
            case messages.Progress(key=key) | messages.Chunk(key=key) as event if key in self.running:
                return [JobUpdate(self.running[key], event)]
            case (messages.Done(key=key) | messages.Failed(key=key) | messages.Stopped(key=key)) as event \
                    if key in self.running:
                return [JobUpdate(self.running.pop(key), event)]
            case messages.StepReport(reports=reports):  # one batch step's reports, in their order
                step = [self.on_message(FromWorker(tagged.generation, report)) for report in reports]
                return [update for updates in step for update in updates]
            case messages.Exited(code=code):
                return self._on_exit(code)
        return []

    def _on_ready(self) -> None:
        self._state, self._held_model = "ready", False
        # a restarted process starts unthrottled and running: tell it the current settings
        if self._throttle != (self.settings.threads, 0.0):
            self._send(messages.Throttle(*self._throttle))
        if self._paused:
            self._send(messages.Pause())
        if self._pending_load is not None:
            entry, self._pending_load = self._pending_load, None
            self._state, self._held_model = "loading", True
            self._send(messages.Load(entry, self._slots))

    def _on_loaded(self, info: ModelInfo) -> None:
        assert self._loading is not None  # Loaded only ever answers a Load
        self._state, self._model, self._loading = "ready", _Model(self._loading, info), None
        self._backoff = BACKOFF_FIRST
        self._load_crashes.pop(info.id, None)
        self._last_crash = ""
        log.info("model %s loaded (context %d, chat template: %s)", info.id, info.context_size, info.chat_template)

    def _on_load_failed(self, failed: messages.LoadFailed) -> messages.LoadFailed:
        self._loading, self._state = None, "ready"
        if failed.still_loaded is not None and self._before_load and self._before_load.entry.id == failed.still_loaded:
            self._model = self._before_load
        log.error("model %s failed to load: %s", failed.model_id, failed.error.message)
        return failed

    def _on_exit(self, code: int | None) -> list[JobUpdate | messages.LoadFailed]:
        how = describe_exit(code)
        was = "generating" if self.running else {"ready": "idle"}.get(self._state, self._state)
        loading, crashed = self._loading, self.running
        self._process, self._state, self._model, self._loading, self.running = None, "down", None, None, {}
        now = time.monotonic()
        deliberate, self._deliberate = self._deliberate, ""
        if deliberate:  # stopped on purpose: not a crash, no back-off
            self._last_crash = f"stopped on purpose: {deliberate}"
            log.warning("worker process %s because %s; restarting it", how, deliberate)
            self.metrics.worker_restarts.inc()
            self._restart_at = now
            return [JobUpdate(job, messages.Crashed(key, how)) for key, job in crashed.items()]
        self._last_crash = how
        self._crashes.append(now)
        window = self.config.worker.restart_window
        while self._crashes and self._crashes[0] < now - window:
            self._crashes.popleft()
        if len(self._crashes) > self.config.worker.max_restarts:
            self._state, self._restart_at = "failed", now + window
            self.failure = (f"the inference worker died {len(self._crashes)} times within {window:g} s "
                            f"(worker.max_restarts = {self.config.worker.max_restarts}; last: {how}); not "
                            f"restarting it for {window:g} s (worker.restart_window)")
            log.error("worker process exited (%s) while %s", how, was)
            log.error("%s", self.failure)
        else:
            self.metrics.worker_restarts.inc()
            # the delay is logged so that an operator (and the back-off test) can see it grow in a crash loop
            log.error("worker process exited (%s) while %s; restarting it in %.1f s", how, was, self._backoff)
            self._restart_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if crashed:
            return [JobUpdate(job, messages.Crashed(key, how)) for key, job in crashed.items()]
        if was == "loading" and loading is not None:
            crashes = self._load_crashes.get(loading.id, 0) + 1
            self._load_crashes[loading.id] = crashes
            if crashes >= LOAD_CRASHES_BEFORE_GIVING_UP:
                return [messages.LoadFailed(loading.id, ModelError(
                    f"model '{loading.id}': the worker died {crashes} times while loading it (last: {how})"))]
        return []

    def describe(self) -> tuple[str, str | None, str]:
        """(state, model, reason) for the status board; the scheduler adds 'busy' and failures."""
        if self._state == "failed":
            return "error", None, self.failure
        if self._state == "loading":
            return "loading", self._loading.id if self._loading else None, ""
        if self._state in ("down", "starting") and self._last_crash:
            if self._last_crash.startswith("stopped on purpose"):
                return "degraded", None, f"inference worker restarting ({self._last_crash})"
            return "degraded", None, f"inference worker restarting after it died ({self._last_crash})"
        if self.loaded is not None:
            return "ready", self.loaded, ""
        return "idle", None, ""
