"""Tensor models (ONNX) through onnxruntime: one session per catalog entry, opened on its first request.

Unlike the text backends this engine keeps several models open at once: sensor and classifier models are small,
and they run in their own child process (appliance/process/onnx_worker.py) beside the language model's.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance import catalog
from appliance.catalog.entry import ModelEntry
from appliance.errors import BackendUnavailable, ModelError

log = logging.getLogger("appliance.infer")


class OnnxSessions:
    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self._sessions: dict[str, Any] = {}

    def get(self, entry: ModelEntry) -> Any:
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

    def run(self, entry: ModelEntry, arrays: dict[str, Any]) -> dict[str, Any]:
        session = self.get(entry)
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, arrays)
        except Exception as exc:
            raise ModelError(f"model '{entry.id}': onnxruntime failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        return dict(zip(names, values, strict=True))
