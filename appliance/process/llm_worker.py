"""The inference child process: one backend, one loaded model, one generation at a time.

It runs apart from the transports so that a crash, an abort or an OOM kill inside the engine cannot take MQTT or
HTTP down. It talks to the parent over a pipe in small tuples:

parent -> child   ("load", entry) | ("unload",) | ("generate", job_key, task) | ("cancel", job_key)
                  | ("pause",) | ("resume",) | ("throttle", threads, seconds_between_tokens) | ("shutdown",)
child -> parent   ("ready", pid) | ("loaded", info) | ("unloaded",)
                  | ("load_failed", code, message, id of the model still loaded or None)
                  | ("progress", job_key, done, total) (prompt batches; total 0: tokens generated so far)
                  | ("piece", job_key, text) (streamed requests only)
                  | ("done", job_key, finished) | ("failed", job_key, code, message, param)
                  | ("cancelled", job_key)

Request text crosses the pipe but is never logged here.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

from appliance import backends, catalog
from appliance.backends.base import Backend, EngineSettings, Piece, PromptProgress
from appliance.errors import ApplianceError, Internal
from appliance.protocol import Completion

log = logging.getLogger("appliance.worker")

OOM_SCORE_ADJ = 800
PROGRESS_EVERY = 0.5  # seconds between liveness reports of a non-streamed generation


class _Child:
    def __init__(self, conn: Connection, settings: EngineSettings, verify: bool) -> None:
        self.conn = conn
        self.settings = settings
        self.verify = verify
        self.backend: Backend | None = None
        self.loaded_id: str | None = None
        self.backlog: deque = deque()  # messages that arrived while generating
        self.stopping = False
        self.paused = False
        self.threads = settings.threads
        self.token_delay = 0.0

    def run(self) -> None:
        self.conn.send(("ready", os.getpid()))
        while not self.stopping:
            message = self.backlog.popleft() if self.backlog else self.conn.recv()
            op = message[0]
            if op == "load":
                self._load(message[1])
            elif op == "generate":
                self._generate(message[1], message[2])
            elif op == "unload":
                self._close_backend()
                self.conn.send(("unloaded",))
            elif op == "shutdown":
                self.stopping = True
            else:
                self._control(message)  # a "cancel" for a job that is no longer running needs nothing
        self._close_backend()

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend, self.loaded_id = None, None

    def _control(self, message: tuple) -> bool:
        """Apply a pause, resume or throttle message; False for anything else."""
        op = message[0]
        if op == "pause":
            self.paused = True
        elif op == "resume":
            self.paused = False
        elif op == "throttle":
            self.threads, self.token_delay = message[1], message[2]
            if self.backend is not None:
                self.backend.set_threads(self.threads)
        else:
            return False
        return True

    def _load(self, entry: catalog.ModelEntry) -> None:
        try:
            # what can be refused without loading (digest, architecture) is refused while the current model
            # still serves
            if self.verify:
                catalog.verify(entry)
            backend = backends.create(entry.backend, self.settings)
            backend.check(entry)
        except ApplianceError as exc:
            self.conn.send(("load_failed", exc.code, exc.message, self.loaded_id))
            return
        self._close_backend()  # one model in memory at a time
        try:
            info = backend.load(entry)
            if self.threads != self.settings.threads:
                backend.set_threads(self.threads)
        except ApplianceError as exc:
            self.conn.send(("load_failed", exc.code, exc.message, None))
            return
        except Exception as exc:  # an engine bug must be reported, not kill the worker silently
            log.exception("loading model %s failed", entry.id)
            self.conn.send(("load_failed", Internal.code, f"loading '{entry.id}' failed: {type(exc).__name__}", None))
            return
        self.backend, self.loaded_id = backend, entry.id
        self.conn.send(("loaded", info))

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
            if message[0] == "cancel" and message[1] == key:
                return True
            if message[0] == "shutdown":
                self.stopping = True
                return True
            if not self._control(message) and message[0] != "cancel":
                self.backlog.append(message)
        return False

    def _generate(self, key: int, task) -> None:
        if self.backend is None:
            self.conn.send(("failed", key, "model_error", "no model is loaded", None))
            return
        finished, pieces, last_report = False, 0, time.monotonic()
        try:
            for event in self.backend.generate(task, lambda: self._should_stop(key)):
                if isinstance(event, Piece):
                    pieces += 1
                    if task.stream:
                        self.conn.send(("piece", key, event.text))
                    elif time.monotonic() - last_report >= PROGRESS_EVERY:
                        # Without a stream, one small message a second is enough to show the worker is alive;
                        # a message per token would cost the parent CPU that the engine's threads need.
                        last_report = time.monotonic()
                        self.conn.send(("progress", key, pieces, 0))
                elif isinstance(event, PromptProgress):
                    self.conn.send(("progress", key, event.done, event.total))
                elif isinstance(event, Completion):
                    finished = True
                    self.conn.send(("done", key, event))
        except ApplianceError as exc:
            self.conn.send(("failed", key, exc.code, exc.message, exc.param))
            return
        except Exception as exc:
            log.exception("generation failed inside the engine")
            self.conn.send(("failed", key, "model_error", f"the engine failed: {type(exc).__name__}", None))
            return
        if not finished:
            self.conn.send(("cancelled", key))


def main(conn: Connection, settings: EngineSettings, verify: bool, log_level: int) -> None:
    """Entry point of the child process (started with the ``spawn`` method)."""
    # The parent owns shutdown: Ctrl-C in a terminal reaches the whole process group, so ignore it here and
    # wait for the parent's "shutdown" message (or its death, which closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # When memory runs out, the kernel should kill this process (the service restarts it), not the one holding
    # the MQTT session and the HTTP server. Raising one's own score needs no privilege.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    faulthandler.enable()  # a segfault in the engine leaves a traceback on stderr for the journal
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the parent went away
        _Child(conn, settings, verify).run()
