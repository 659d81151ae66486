"""The ONNX worker: a child process that runs the catalog's tensor models, one request at a time.

It answers Infer with Inferred, Embed with Embedded (tensors/embedder.py), or either with Failed
(appliance/messages.py), until Shutdown.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import ClassVar

from appliance.backends.onnx import OnnxSessions
from appliance.errors import ApplianceError
from appliance.messages import Embed, Embedded, Failed, Infer, Inferred, Ready, Shutdown
from appliance.tensors.embedder import Embedder


@dataclass(frozen=True)
class OnnxWorker:
    """The ONNX worker's program (appliance/process/bootstrap.py starts it)."""

    verify: bool  # check each model's sha256 before opening it

    name: ClassVar[str] = "appliance-infer"
    oom_score_adj: ClassVar[int] = 700  # below the inference worker's: the language model goes first

    def serve(self, conn: Connection) -> None:
        sessions = OnnxSessions(self.verify)
        embedder = Embedder(sessions)
        conn.send(Ready(os.getpid()))
        while True:
            match conn.recv():
                case Shutdown():
                    return
                case Infer(key=key, entry=entry, arrays=arrays):
                    started = time.perf_counter()
                    try:
                        outputs = sessions.run(entry, arrays)
                    except ApplianceError as exc:
                        conn.send(Failed(key, exc))
                        continue
                    conn.send(Inferred(key, outputs, (time.perf_counter() - started) * 1000))
                case Embed(key=key, entry=entry, texts=texts, truncate=truncate):
                    started = time.perf_counter()
                    try:
                        result = embedder.embed(entry, texts, truncate)
                    except ApplianceError as exc:
                        conn.send(Failed(key, exc))
                        continue
                    conn.send(Embedded(key, result.vectors, result.tokens, (time.perf_counter() - started) * 1000))
