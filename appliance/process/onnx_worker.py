"""The ONNX child process: onnxruntime sessions for the catalog's tensor models, one request at a time.

parent -> child   ("infer", key, entry, {input name: ndarray}) | ("shutdown",)
child -> parent   ("ready", pid) | ("result", key, {output name: ndarray}, milliseconds)
                  | ("failed", key, code, message)
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

from appliance import catalog
from appliance.catalog import ModelEntry
from appliance.errors import ApplianceError, BackendUnavailable, ModelError

log = logging.getLogger("appliance.infer")
OOM_SCORE_ADJ = 700


class _Sessions:
    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self._sessions: dict[str, object] = {}

    def get(self, entry: ModelEntry):
        key = f"{entry.id}:{entry.sha256}"
        if key not in self._sessions:
            try:
                import onnxruntime
            except ImportError:
                raise BackendUnavailable("ONNX models need onnxruntime: pip install 'appliance[onnx]'") from None
            if self.verify:
                catalog.verify(entry)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1  # sensor models are small; leave the cores to the language model
            options.log_severity_level = 3
            try:
                session = onnxruntime.InferenceSession(str(entry.path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(f"model '{entry.id}': onnxruntime could not load {entry.path}: {exc}") from None
            wanted = {s.name for s in entry.inputs}
            actual = {i.name for i in session.get_inputs()}
            if wanted != actual:
                raise ModelError(f"model '{entry.id}': the catalog declares inputs {sorted(wanted)} but the file "
                                 f"has {sorted(actual)}")
            self._sessions[key] = session
            log.info("loaded ONNX model %s", entry.id)
        return self._sessions[key]

    def run(self, entry: ModelEntry, arrays: dict) -> dict:
        session = self.get(entry)
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, arrays)
        except Exception as exc:
            raise ModelError(f"model '{entry.id}': onnxruntime failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        return dict(zip(names, values, strict=True))


def main(conn: Connection, verify: bool, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    faulthandler.enable()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    sessions = _Sessions(verify)
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "shutdown":
                break
            _, key, entry, arrays = message
            started = time.perf_counter()
            try:
                outputs = sessions.run(entry, arrays)
            except ApplianceError as exc:
                conn.send(("failed", key, exc.code, exc.message))
                continue
            conn.send(("result", key, outputs, (time.perf_counter() - started) * 1000))
