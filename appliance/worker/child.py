"""The inference child process: one backend, one loaded model, one generation at a time.

It runs apart from the transports so that a crash, an abort or an OOM kill inside the engine cannot take MQTT or
HTTP down. It talks to the parent over a pipe in small tuples:

parent -> child   ("load", entry) | ("generate", job_key, task) | ("cancel", job_key) | ("shutdown",)
child -> parent   ("ready", pid) | ("loaded", info) | ("load_failed", code, message)
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

from appliance import backends, catalog
from appliance.backends.base import Backend, EngineSettings, Piece, PromptProgress
from appliance.errors import ApplianceError, Internal
from appliance.protocol import Completion

log = logging.getLogger("appliance.worker")

PROGRESS_EVERY = 1.0  # seconds between liveness reports of a non-streamed generation


class _Child:
    def __init__(self, conn: Connection, settings: EngineSettings, verify: bool) -> None:
        self.conn = conn
        self.settings = settings
        self.verify = verify
        self.backend: Backend | None = None
        self.backlog: deque = deque()  # messages that arrived while generating
        self.stopping = False

    def run(self) -> None:
        self.conn.send(("ready", os.getpid()))
        while not self.stopping:
            message = self.backlog.popleft() if self.backlog else self.conn.recv()
            op = message[0]
            if op == "load":
                self._load(message[1])
            elif op == "generate":
                self._generate(message[1], message[2])
            elif op == "shutdown":
                self.stopping = True
            # a "cancel" for a job that is no longer running needs nothing
        if self.backend is not None:
            self.backend.close()

    def _load(self, entry: catalog.ModelEntry) -> None:
        try:
            if self.backend is not None:
                self.backend.close()
                self.backend = None
            if self.verify:
                catalog.verify(entry)
            backend = backends.create(entry.backend, self.settings)
            info = backend.load(entry)
        except ApplianceError as exc:
            self.conn.send(("load_failed", exc.code, exc.message))
            return
        except Exception as exc:  # an engine bug must be reported, not kill the worker silently
            log.exception("loading model %s failed", entry.id)
            self.conn.send(("load_failed", Internal.code, f"loading '{entry.id}' failed: {type(exc).__name__}"))
            return
        self.backend = backend
        self.conn.send(("loaded", info))

    def _should_stop(self, key: int) -> bool:
        """Polled by the backend between batches and tokens: has the parent cancelled this job?"""
        while self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cancel" and message[1] == key:
                return True
            if message[0] == "shutdown":
                self.stopping = True
                return True
            if message[0] != "cancel":
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
    faulthandler.enable()  # a segfault in the engine leaves a traceback on stderr for the journal
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the parent went away
        _Child(conn, settings, verify).run()
