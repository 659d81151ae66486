"""The parent's handle on one child process: start it, talk to it, notice when it dies, kill it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from appliance.messages import Exited, Shutdown
from appliance.process import bootstrap
from appliance.process.bootstrap import Program

log = logging.getLogger(__name__)

OnMessage = Callable[[Any], None]


class ChildHandle(Protocol):
    """What the parent needs of a running child (a test may run the same program in a thread instead)."""

    pid: int | None

    def send(self, message: object) -> bool: ...
    def kill(self) -> None: ...
    def close(self, timeout: float = 10.0) -> None: ...


#: starts ``program`` as child number ``generation``; every message it sends, and finally Exited, goes to on_message
Spawn = Callable[[Program, int, OnMessage], ChildHandle]


class PipeHandle:
    """The parent's end of a worker's pipe: a reader thread that hands every message on, sending, closing.
    Subclasses start the worker and the reader, and know how to kill it."""

    _conn: Connection
    _reader: threading.Thread
    pid: int | None

    def __init__(self) -> None:
        self._send_lock = threading.Lock()
        self._closed = False

    def send(self, message: object) -> bool:
        """Send a message; False when the worker is already gone (its Exited will follow)."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, wait up to ``timeout``, then kill it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.send(Shutdown())
        self._reader.join(timeout)
        if self._reader.is_alive():
            log.warning("worker %s did not exit within %.0f s of shutdown", self.pid, timeout)
            self.kill()
            self._reader.join(10)
        self._conn.close()


# What every child starts with (the service's own environment wins, so an operator can set either differently).
# - glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, as llama.cpp frees a
#   context on every load, so later buffers up to that size come from the heap and stay there after they are freed:
#   4 MiB more resident in a worker that has served a batch of SmolLM2. Setting the trim threshold (to its default)
#   turns that adjustment off. Only glibc reads it.
# - llama.cpp's CPU threads meet at an OpenMP barrier after every step of the graph (hundreds per token), and
#   libgomp's threads spin 300000 times there before they sleep. On a board whose cores are shared (mosquitto, the
#   service streaming answers, a sensor app, the ONNX child) a spinning thread burns the time slice its preempted
#   partner needs: with one core of two busy, SmolLM2 ran 28-38 tok/s alone and 40-47 four at a time; with both busy,
#   13-14 and 21-22. Spinning 300 times gives 44-45 / 72-77 and 47-49 / 71-72. Its price on idle cores is a
#   wake-up per token: about 5 % of one SmolLM2 request's speed (8 ms a token), a far smaller share of a larger
#   model's; sleeping at once (OMP_WAIT_POLICY=passive) would cost 60 % (docs/benchmarks.md has the runs).
#   Only libgomp (llama.cpp's and torch's OpenMP on Linux) reads it.
CHILD_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024), "GOMP_SPINCOUNT": "300"}


class WorkerProcess(PipeHandle):
    """A child running ``program``: a fresh interpreter (``python -P -m appliance.process <fd>``, no fork: the parent
    runs paho and HTTP threads, which a fork would copy mid-flight) on one end of a socket pair, whose first message
    is the program (:func:`appliance.process.bootstrap.from_parent`).

    Every message from the child, and finally :class:`~appliance.messages.Exited`, is passed to ``on_message`` from
    a reader thread. Only that thread waits for (reaps) the child: two threads waiting on one pid race, and the
    loser can take a reaped child for a live one.

    Not multiprocessing's ``spawn``: it starts a resource tracker for every parent, one more Python process (8 MiB
    of PSS) watching for semaphores and shared memory, which no process here makes.
    """

    def __init__(self, program: Program, generation: int, on_message: OnMessage) -> None:
        super().__init__()
        self._on_message = on_message
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        try:
            # -P: the working directory stays off sys.path, so the child imports the parent's appliance package, not
            # whatever a directory named "appliance" where the service was started holds
            self._process = subprocess.Popen([sys.executable, "-P", "-m", "appliance.process", str(theirs.fileno())],
                                             pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                             env={**CHILD_ENV, **os.environ})
        finally:
            theirs.close()
        self.pid = self._process.pid
        # a child that died at once has closed its end: the reader below reports its Exited
        self.send(bootstrap.Start(program, logging.getLogger("appliance").level))
        self._exited = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{program.name}-reader-{generation}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._on_message(message)
        try:
            self._process.wait(timeout=10)  # the pipe closed: the child is exiting
        except subprocess.TimeoutExpired:
            self.kill()
            self._process.wait()
        self._exited.set()
        self._on_message(Exited(self._process.returncode))

    def kill(self) -> None:
        """SIGKILL: used when the child does not stop on request (stuck in the engine)."""
        if not self._exited.is_set() and self.pid is not None:
            log.warning("killing worker process %s", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
