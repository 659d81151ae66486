"""A batch for engines without one of their own: the requests' generators take turns, one event each per step.

Nothing runs faster than one request at a time; what it gives is the batch's behaviour (requests joining and
leaving between steps, each with its own events), so the scheduling around continuous batching is tested with the
fake engine (backends/fake.py, ``worker.parallel`` > 1) in seconds and without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from appliance.backends.base import GenerationEvent, SequenceBatch, SequenceEvent
from appliance.errors import ApplianceError, ModelError
from appliance.protocol import Completion

if TYPE_CHECKING:
    from appliance.backends.base import GenerationTask

#: starts one request: its events, None where it has nothing to report this step (time passes inside it)
Start = Callable[["GenerationTask", Callable[[], bool]], Iterator[GenerationEvent | None]]


class InterleavedBatch(SequenceBatch):
    def __init__(self, start: Start, slots: int) -> None:
        self.slots = slots
        self._start = start
        self._running: dict[int, Iterator[GenerationEvent | None]] = {}
        self._leaving: set[int] = set()

    @property
    def keys(self) -> list[int]:
        return list(self._running)

    def join(self, key: int, task: GenerationTask) -> None:
        if len(self._running) >= self.slots:
            raise ModelError(f"the batch is full ({self.slots} requests)")
        # should_stop: a generator only ever stops by leaving, which closes it between steps
        self._running[key] = iter(self._start(task, lambda: key in self._leaving))

    def leave(self, key: int) -> None:
        generator = self._running.pop(key, None)
        if generator is not None and hasattr(generator, "close"):  # a generator: its finally blocks run now
            self._leaving.add(key)
            generator.close()
            self._leaving.discard(key)

    def step(self) -> list[SequenceEvent]:
        events: list[SequenceEvent] = []
        for key, generator in list(self._running.items()):
            try:
                event: GenerationEvent | ApplianceError | None = next(generator)
            except StopIteration:
                event = ModelError("the engine ended a generation without an answer")
            except ApplianceError as exc:
                event = exc
            if event is None:
                continue
            if isinstance(event, Completion | ApplianceError):
                del self._running[key]  # it has ended: it leaves the batch
            events.append(SequenceEvent(key, event))
        return events
