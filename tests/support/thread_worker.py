"""A worker program run in a thread of the test process instead of a child process.

It is the same program (the inference worker's loop, with the registered fake backend), speaking the same messages
over a real pipe, so every message is pickled both ways as in production; only the process is missing. That makes
a scheduler test take milliseconds instead of a process start. What needs a real process (a kill, a crash, an exit
code, a restart) uses :class:`appliance.process.handle.WorkerProcess` instead.

``kill()`` cannot stop a thread: it reports the worker dead at once (``Exited(-9)``, as SIGKILL would) and closes
the parent's end of the pipe, so the abandoned thread finds its pipe broken at its next send or receive and ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading

from appliance.messages import Exited
from appliance.process.bootstrap import Program
from appliance.process.handle import OnMessage, PipeHandle

SIGKILL_EXIT = -9


class ThreadWorker(PipeHandle):
    pid = None  # no process of its own: nothing to measure or signal

    def __init__(self, program: Program, generation: int, on_message: OnMessage) -> None:
        super().__init__()
        self._on_message = on_message
        self._conn, child_conn = multiprocessing.Pipe(duplex=True)
        self._exit_code: int | None = None
        self._killed = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(program, child_conn),
                                        name=f"{program.name}-{generation}", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"{program.name}-reader-{generation}", daemon=True)
        self._thread.start()
        self._reader.start()

    def _serve(self, program: Program, conn) -> None:
        code = 0
        try:
            program.serve(conn)
        except SystemExit as exc:  # the fake engine's "exit" step: what the process would exit with
            code = exc.code if isinstance(exc.code, int) else 1
        except (EOFError, OSError):  # the parent went away (or killed us)
            pass
        except BaseException:  # noqa: BLE001 - an uncaught exception ends a process with code 1
            code = 1
        finally:
            self._exit_code = code
            conn.close()

    def _read(self) -> None:
        while not self._killed.is_set():
            try:
                if not self._conn.poll(0.01):
                    continue
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._on_message(message)
        if not self._killed.is_set():
            self._thread.join()
        self._on_message(Exited(SIGKILL_EXIT if self._killed.is_set() else self._exit_code))
        with contextlib.suppress(OSError):
            self._conn.close()

    def send(self, message: object) -> bool:
        return not self._killed.is_set() and super().send(message)

    def kill(self) -> None:
        self._killed.set()
