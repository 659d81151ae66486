"""`make bench`, part of bench/batching.py: llama.cpp's own C++ ``llama-server`` as the baseline, run beside the
appliance so that their rounds can alternate (the 2-core build machine's speed drifts by a fifth within minutes:
figures taken ten minutes apart compare the machine, not the servers).

It serves its own copy of the model file: two processes mapping one file share its page-cache pages, and each
one's PSS would then count only half of the model. Its prompt cache in host memory (``--cache-ram``, 8 GiB by
default: every finished prompt's KV state kept for a later request) is off: it grew llama-server's RSS by about
50 MiB over the bench's rounds, memory the appliance does not spend (its sequences keep their prefixes in the KV
cells each slot has anyway), so the memory ratio would flatter the appliance.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from appliance.transports.broker import free_port


class LlamaServer:
    """``llama-server -np 4`` on loopback; ``-c`` is the total over the 4 slots, so each slot gets ``context`` as
    each of the appliance's does. Stopped by ``close()`` (idempotent) or the ``with`` block."""

    def __init__(self, binary: Path, model: Path, threads: int, context: int, workdir: Path) -> None:
        own_model = workdir / f"llama-server-{model.name}"
        shutil.copyfile(model, own_model)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [str(binary), "-m", str(own_model), "-t", str(threads), "-c", str(context * 4), "-np", "4",
             "--cache-ram", "0", "--port", str(port), "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_healthy(120)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None, "llama-server was stopped"
        return self.proc.pid

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return
            except OSError:
                if self.proc is not None and self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"llama-server exited with {code} before it was healthy") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
