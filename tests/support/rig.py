"""A real Scheduler, with its worker slot, guard and admission, driving the inference worker's real loop on the
registered fake engine (appliance/backends/fake.py): the unit tier's test bench.

The worker runs in a thread (tests/support/thread_worker.py) unless a test asks for a real process
(``process=True``), which those about kills, crashes and restarts do.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.catalog import Catalog
from appliance.catalog.entry import ModelEntry
from appliance.config import Config, load_config
from appliance.generation.jobs import Job, Requester
from appliance.generation.scheduler import Scheduler
from appliance.messages import Chunk, JobEvent
from appliance.metrics import Metrics
from appliance.process.handle import WorkerProcess
from appliance.protocol import parse_generate
from appliance.status import StatusBoard
from appliance.supervisor.guard import Guard
from appliance.supervisor.policies import Conditions
from appliance.supervisor.sensors import MemoryReading
from tests.support.thread_worker import ThreadWorker

#: who sends the rig's requests unless a test says otherwise (see Requester: only its own cancels stop them)
ME = Requester(reply_to="rig/replies")

#: quick timers, so that a timeout, a stall or a grace period is tens of milliseconds in a test, not minutes
FAST = {"request_timeout": 5.0, "stall_timeout": 2.0, "cancel_grace": 0.3, "load_timeout": 5.0, "max_queue": 4,
        "threads": 4}


class Recorder:
    """A job's sink that keeps what it is sent."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
        self.chunks: list[Chunk] = []

    def send(self, job: Job, event: JobEvent) -> None:
        self.events.put(event)

    def final(self, timeout: float = 10.0) -> JobEvent:
        """The event that ended the job (chunks before it are kept in ``chunks``)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            if not isinstance(event, Chunk):
                return event
            self.chunks.append(event)

    def next_chunk(self, timeout: float = 10.0) -> Chunk:
        event = self.events.get(timeout=timeout)
        assert isinstance(event, Chunk), event
        self.chunks.append(event)
        return event

    def nothing_more(self, wait: float = 0.2) -> bool:
        try:
            self.events.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


def fake_model(directory: Path, model_id: str, **settings: Any) -> ModelEntry:
    """A catalog entry for the fake engine; ``settings`` are its model file's keys (load_seconds, load_error ...)."""
    path = directory / f"{model_id}.json"
    path.write_text(json.dumps(settings))
    return ModelEntry(id=model_id, path=path, sha256=None, backend="fake", commercial_use=True)


def config_with(**sections: dict[str, Any]) -> Config:
    """The default config (no file, no environment) with some keys of some sections changed."""
    config = load_config(None, env={})
    for section, values in sections.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


class Rig:
    def __init__(self, tmp_path: Path, fakes: dict[str, dict[str, Any]] | None = None, *, process: bool = False,
                 reading: MemoryReading | None = None, **sections: dict[str, Any]) -> None:
        """``fakes``: model id -> its fake model file's settings (default: one model "m" that loads at once);
        ``reading``: what the guard reads as the board's memory (None: no reading);
        ``sections``: config keys to change, by section (``worker={"max_queue": 1}``)."""
        fakes = fakes if fakes is not None else {"m": {}}
        entries = [fake_model(tmp_path, model_id, **settings) for model_id, settings in fakes.items()]
        sections.setdefault("models", {})
        sections["models"] = {"default": entries[0].id, **sections["models"]}
        sections["worker"] = {**FAST, **sections.get("worker", {})}
        self.config = config_with(**sections)
        self.catalog = Catalog(entries, "test")
        self.status = StatusBoard("rig")
        self.metrics = Metrics()
        self.reading = reading
        self.guard = Guard(self.config, lambda: self.reading)
        self.scheduler = Scheduler(self.catalog, self.config, self.status, self.metrics, self.guard,
                                   spawn=WorkerProcess if process else ThreadWorker)

    def start(self) -> Rig:
        self.scheduler.start()
        return self

    def submit(self, prompt: str, requester: Requester = ME, **fields: Any) -> tuple[Job, Recorder]:
        """Submit a request (``fields``: model, id, stream, max_tokens, priority ...); raises what submit raises."""
        sink = Recorder()
        request = parse_generate({"prompt": prompt, "stream": True, **fields})
        return self.scheduler.submit(request, sink, "test", requester), sink

    def cancel(self, request_id: str, requester: Requester = ME) -> None:
        """A cancel by id, as the MQTT cancel topic sends it."""
        self.scheduler.cancel(request_id, requester)

    def conditions(self, **values: Any) -> None:
        self.scheduler.set_conditions(Conditions(**values))

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}; status {self.status.current}")
            time.sleep(0.005)

    def wait_state(self, state: str, timeout: float = 10.0) -> None:
        self.wait(lambda: self.status.current.state == state, timeout, f"state {state}")

    def counted(self, outcome: str) -> float:
        return self.metrics.requests.labels("test", outcome)._value.get()

    def close(self) -> None:
        self.scheduler.close()
