"""The inference worker's own loop (appliance/process/llm_worker.py) when the service goes away mid-generation: a
stop, a restart or a kill of the service closes the pipe while a piece is being sent or a cancel polled for. That is
no engine failure: the worker must end quietly, as bootstrap.main expects, and log nothing."""

from __future__ import annotations

import logging
import multiprocessing
import threading

import pytest

from appliance.backends.base import EngineSettings, GenerationTask
from appliance.backends.fake import script
from appliance.messages import Chunk, Generate, Load, Loaded, Ready
from appliance.process.llm_worker import LlmWorker
from appliance.protocol import SamplingParams
from tests.support.rig import fake_model


class _WorkerThread:
    """The worker program on one end of a real pipe, in a thread; ``ended_by`` is what ended its loop."""

    def __init__(self, parallel: int) -> None:
        self.parent, child = multiprocessing.Pipe(duplex=True)
        settings = EngineSettings(threads=1, context_size=64, batch_size=8, parallel=parallel)
        self.ended_by: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, args=(LlmWorker(settings, verify=False), child))
        self.thread.start()

    def _serve(self, worker: LlmWorker, conn) -> None:
        try:
            worker.serve(conn)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            self.ended_by = exc
        finally:
            conn.close()


@pytest.mark.parametrize("parallel", [1, 2], ids=["alone", "batched"])
@pytest.mark.parametrize("steps", [
    (["pieces", 100000],),  # the worker is sending pieces when the pipe closes
    (["piece", "a"], ["sleep", 30]),  # the worker is polling for a cancel when the pipe closes
], ids=["sending", "polling"])
def test_a_closed_pipe_mid_generation_ends_the_worker_without_an_engine_failure(tmp_path, caplog, parallel, steps):
    worker = _WorkerThread(parallel)
    parent = worker.parent
    assert isinstance(parent.recv(), Ready)
    parent.send(Load(fake_model(tmp_path, "m"), slots=parallel))
    assert isinstance(parent.recv(), Loaded)
    task = GenerationTask(prompt=script(*steps), messages=None, params=SamplingParams(max_tokens=200000))
    with caplog.at_level(logging.DEBUG, logger="appliance"):
        parent.send(Generate(1, task))
        assert isinstance(parent.recv(), Chunk)  # it is generating
        parent.close()  # the service is gone
        worker.thread.join(timeout=30)
    assert not worker.thread.is_alive()
    assert isinstance(worker.ended_by, (EOFError, OSError)), worker.ended_by  # what bootstrap.main ends quietly on
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
