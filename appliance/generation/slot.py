"""The worker's life as the scheduler sees it: spawn, load, generate, crash, back off, restart.

:class:`WorkerSlot` wraps the current :class:`WorkerProcess` and turns its raw messages into a few outcomes
(``piece``, ``done``, ``failed``, ``cancelled``, ``crashed``, ``load_failed``). It is used only from the scheduler
thread; raw events reach it through the scheduler's inbox, tagged with the process generation so that messages
from a process that was already replaced are dropped.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable

from appliance.backends.base import EngineSettings, GenerationTask, ModelInfo
from appliance.catalog import ModelEntry
from appliance.config import Config
from appliance.metrics import Metrics
from appliance.process.handle import WorkerProcess

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
LOAD_CRASHES_BEFORE_GIVING_UP = 3


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerSlot:
    def __init__(self, settings: EngineSettings, config: Config, metrics: Metrics,
                 post: Callable[[tuple], None]) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self._post = post
        self._process: WorkerProcess | None = None
        self._generation = 0
        self._state = "down"  # down | starting | idle | loading | unloading | generating | failed
        self.loaded: str | None = None
        self.info: ModelInfo | None = None
        self._loading: ModelEntry | None = None
        self._load_deadline = 0.0
        self._job_key: int | None = None
        self._restart_at: float | None = None
        self._backoff = BACKOFF_FIRST
        self._load_crashes: dict[str, int] = {}
        self._last_crash = ""
        self._crashes: deque[float] = deque()
        self.failure = ""  # set when the worker crashed too often and stays down
        self._closing = False
        self.loaded_entry: ModelEntry | None = None
        self._before_load: tuple = (None, None, None)
        self._held_model = False  # this process has loaded a model (the next load gets a fresh process)
        self._pending_load: ModelEntry | None = None
        self._throttle = (settings.threads, 0.0)
        self._paused = False

    # -- commands ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._generation += 1
        generation = self._generation
        self._state = "starting"
        self._restart_at = None
        self._process = WorkerProcess(
            self.settings, verify=self.config.models.verify, log_level=logging.getLogger("appliance").level,
            on_event=lambda event: self._post((generation, event)), generation=generation)
        log.info("worker process %s started", self._process.pid)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def idle(self) -> bool:
        return self._state == "idle"

    def load(self, entry: ModelEntry) -> None:
        """Load a model; a process that already held another model is replaced by a fresh one first.

        A fresh process gives the previous model's memory back to the system (a freed heap is not always
        returned) and leaves no engine state behind: RWKV-7 in llama.cpp 0.3.36 computed NaNs after other
        architectures had been loaded in the same process.
        """
        log.info("loading model %s (%s)", entry.id, entry.path.name)
        self._state, self._loading = "loading", entry
        self._before_load = (self.loaded, self.info, self.loaded_entry)  # kept if the new one is refused early
        self.loaded, self.info, self.loaded_entry = None, None, None
        self._load_deadline = time.monotonic() + self.config.worker.load_timeout
        if self._held_model:
            self._before_load = (None, None, None)
            self._process.close()  # its exit is of an older generation: not a crash
            self.start()
            self._state, self._pending_load = "loading", entry  # sent once the new process is ready
            return
        self._held_model = True
        self._process.send(("load", entry))

    def unload(self) -> None:
        log.info("unloading model %s", self.loaded)
        self._state = "unloading"
        self._process.send(("unload",))

    def pause(self, paused: bool) -> None:
        """Hold (or release) the running generation between tokens; also applies to later ones."""
        if paused != self._paused:
            self._paused = paused
            if self._process is not None:
                self._process.send(("pause",) if paused else ("resume",))

    def throttle(self, threads: int, token_delay: float) -> None:
        if (threads, token_delay) != self._throttle:
            log.info("worker throttle: %d threads, %.3f s between tokens", threads, token_delay)
            self._throttle = (threads, token_delay)
            if self._process is not None:
                self._process.send(("throttle", threads, token_delay))

    @property
    def throttled(self) -> tuple[int, float]:
        return self._throttle

    def generate(self, key: int, task: GenerationTask) -> None:
        self._state, self._job_key = "generating", key
        self._process.send(("generate", key, task))

    def cancel(self, key: int) -> None:
        if self._process is not None and self._job_key == key:
            self._process.send(("cancel", key))

    def kill(self) -> None:
        if self._process is not None:
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
        if self._state == "down" and self._restart_at is not None and now >= self._restart_at:
            self.start()
        elif self._state == "loading" and now >= self._load_deadline:
            log.error("model load took longer than worker.load_timeout; killing the worker")
            self.kill()

    # -- events ------------------------------------------------------------------------------------------------

    def on_event(self, tagged: tuple) -> tuple | None:
        generation, event = tagged
        if generation != self._generation or self._closing:
            return None
        kind = event[0]
        if kind == "ready":
            self._state, self._held_model = "idle", False
            # a restarted process starts unthrottled and running: tell it the current settings
            if self._throttle != (self.settings.threads, 0.0):
                self._process.send(("throttle", *self._throttle))
            if self._paused:
                self._process.send(("pause",))
            if self._pending_load is not None:
                entry, self._pending_load = self._pending_load, None
                self._state, self._held_model = "loading", True
                self._process.send(("load", entry))
        elif kind == "unloaded":
            self._state, self.loaded, self.info, self.loaded_entry = "idle", None, None, None
        elif kind == "loaded":
            self._state, self.info = "idle", event[1]
            self.loaded, self.loaded_entry, self._loading = self.info.id, self._loading, None
            self._backoff = BACKOFF_FIRST
            self._load_crashes.pop(self.loaded, None)
            self._last_crash = ""
            log.info("model %s loaded (context %d, chat template: %s)", self.info.id, self.info.context_size,
                     self.info.chat_template)
        elif kind == "load_failed":
            entry, self._loading, self._state = self._loading, None, "idle"
            if event[3] is not None and self._before_load[0] == event[3]:
                self.loaded, self.info, self.loaded_entry = self._before_load
            log.error("model %s failed to load: %s", entry.id, event[2])
            return ("load_failed", entry.id, event[1], event[2])
        elif kind in ("piece", "progress", "done", "failed", "cancelled"):
            if event[1] != self._job_key:
                return None
            if kind == "piece":
                return ("piece", event[2])
            if kind == "progress":
                return ("progress",)
            self._state, self._job_key = "idle", None
            if kind == "done":
                return ("done", event[2])
            if kind == "failed":
                return ("failed", (event[2], event[3], event[4]))
            return ("cancelled",)
        elif kind == "exited":
            return self._on_exit(event[1])
        return None

    def _on_exit(self, code: int | None) -> tuple | None:
        how = describe_exit(code)
        was, loading = self._state, self._loading
        self._process, self._state, self.loaded, self.info, self._loading = None, "down", None, None, None
        self.loaded_entry, self._job_key = None, None
        self._last_crash = how
        now = time.monotonic()
        self._crashes.append(now)
        window = self.config.worker.restart_window
        while self._crashes and self._crashes[0] < now - window:
            self._crashes.popleft()
        if len(self._crashes) > self.config.worker.max_restarts:
            self._state, self._restart_at = "failed", None
            self.failure = (f"the inference worker died {len(self._crashes)} times within {window:g} s "
                            f"(worker.max_restarts = {self.config.worker.max_restarts}; last: {how}); not "
                            f"restarting it")
            log.error("worker process exited (%s) while %s", how, was)
            log.error("%s", self.failure)
        else:
            self.metrics.worker_restarts.inc()
            # the delay is logged so that an operator (and the back-off test) can see it grow in a crash loop
            log.error("worker process exited (%s) while %s; restarting it in %.1f s", how, was, self._backoff)
            self._restart_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if was == "generating":
            return ("crashed", how)
        if was == "loading" and loading is not None:
            crashes = self._load_crashes.get(loading.id, 0) + 1
            self._load_crashes[loading.id] = crashes
            if crashes >= LOAD_CRASHES_BEFORE_GIVING_UP:
                return ("load_failed", loading.id, "model_error",
                        f"model '{loading.id}': the worker died {crashes} times while loading it (last: {how})")
        return None

    def describe(self) -> tuple[str, str | None, str]:
        """(state, model, reason) for the status board; the scheduler adds 'busy' and failures."""
        if self._state == "failed":
            return "error", None, self.failure
        if self._state == "loading":
            return "loading", self._loading.id if self._loading else None, ""
        if self._state in ("down", "starting") and self._last_crash:
            return "degraded", None, f"inference worker restarting after it died ({self._last_crash})"
        if self.loaded is not None:
            return "ready", self.loaded, ""
        return "idle", None, ""
