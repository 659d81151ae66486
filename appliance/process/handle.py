"""The parent's handle on one inference child process: start it, talk to it, notice when it dies, kill it."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

from appliance.backends.base import EngineSettings
from appliance.process import llm_worker as child

log = logging.getLogger(__name__)

EventCallback = Callable[[tuple], None]


class WorkerProcess:
    """A spawned child running ``target(conn, *args)`` (by default :func:`appliance.worker.child.main`).

    Every message from the child, and finally ``("exited", exitcode)``, is passed to ``on_event`` from a reader
    thread. Only that thread waits for (reaps) the child: two threads waiting on one pid race, and the loser can
    take a reaped child for a live one.
    """

    def __init__(self, settings: EngineSettings | None, *, verify: bool, log_level: int, on_event: EventCallback,
                 generation: int, target: Callable = child.main, name: str = "appliance-worker") -> None:
        self.generation = generation
        self._on_event = on_event
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent runs paho and HTTP threads
        self._conn, child_conn = ctx.Pipe(duplex=True)
        args = (child_conn, verify, log_level) if settings is None else (child_conn, settings, verify, log_level)
        self._process = ctx.Process(target=target, args=args, name=f"{name}-{generation}", daemon=True)
        self._process.start()
        child_conn.close()
        self.pid = self._process.pid
        self._send_lock = threading.Lock()
        self._exited = threading.Event()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"worker-reader-{generation}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                break
            self._on_event(event)
        self._process.join(timeout=10)  # the pipe closed: the child is exiting
        if self._process.exitcode is None:
            self.kill()
            self._process.join()
        self._exited.set()
        self._on_event(("exited", self._process.exitcode))

    def send(self, message: tuple) -> bool:
        """Send a message; False when the child is already gone (its exit event will follow)."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL: used when the child does not stop on request (stuck in the engine)."""
        if not self._exited.is_set():
            log.warning("killing worker process %s", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit, wait up to ``timeout``, then kill it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.send(("shutdown",))
        self._reader.join(timeout)
        if self._reader.is_alive():
            log.warning("worker process %s did not exit within %.0f s of shutdown", self.pid, timeout)
            self.kill()
            self._reader.join(10)
        self._conn.close()
