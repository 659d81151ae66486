"""The one way every child process starts: what runs before a worker's own loop, whichever worker it is.

A child is a fresh interpreter (``python -P -m appliance.process <fd>``: the parent runs paho and HTTP threads, which
``fork`` would copy mid-flight) holding one end of a socket pair; the parent's first message on it is a
:class:`Start` carrying a :class:`Program`: a small picklable object that says what the child is and runs its loop on
the pipe to the parent.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import ClassVar, Protocol


class Program(Protocol):
    """What a child process runs: the inference worker (llm_worker.py) or the ONNX worker (onnx_worker.py)."""

    #: process name (at most 15 characters, the kernel's limit): what ps, top and the kernel's OOM-killer line show
    #: in place of "python3", and the prefix of the pipe's thread and log names ("appliance-llm-3")
    name: ClassVar[str]
    #: the kernel's OOM killer takes the highest score first: a worker, not the parent holding MQTT and HTTP
    oom_score_adj: ClassVar[int]

    def serve(self, conn: Connection) -> None:
        """Announce Ready, then answer messages until Shutdown; returns (or raises EOFError) when done."""


@dataclass(frozen=True)
class Start:
    """The parent's first message to a new child: what to run, and the parent's log level."""

    program: Program
    log_level: int


def from_parent(fd: int) -> None:
    """``python -P -m appliance.process <fd>``: read the :class:`Start` on the parent's socket and run it."""
    conn = Connection(fd)
    try:
        start = conn.recv()
    except (EOFError, OSError):  # the parent went away before it said what to run
        return
    main(conn, start.program, start.log_level)


def main(conn: Connection, program: Program, log_level: int) -> None:
    """Entry point of every child process."""
    # The parent owns shutdown: Ctrl-C in a terminal reaches the whole process group, so ignore it here and
    # wait for the parent's Shutdown message (or its death, which closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # When memory runs out, the kernel should kill this process (the service restarts it), not the one holding
    # the MQTT session and the HTTP server. Raising one's own score needs no privilege.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(program.oom_score_adj))
    with contextlib.suppress(OSError):  # not Linux: keep the interpreter's name
        Path("/proc/self/comm").write_text(program.name)
    faulthandler.enable()  # a segfault in an engine leaves a traceback on stderr for the journal
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the parent went away
        program.serve(conn)
