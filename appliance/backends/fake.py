"""A scripted engine, registered like the real ones (``backend = "fake"``), as gpiozero ships MockFactory: the
scheduler, the worker's life cycle, the guard, admission and moderation are tested against it in seconds, with no
model and no engine, in a real worker process or in a thread.

**The model file** is a JSON object that says how loading goes and what the probe reports (every key optional)::

    {"load_seconds": 0.2,                       the load takes this long
     "load_error": ["model_error", "bad file"], the load fails with this error code and message
     "load_exit": 3,                            the worker process exits with this code while loading
     "architecture": "opt",                     the probe refuses the file: unsupported_architecture
     "footprint_mib": 300}                      the probe's memory estimate (none without it)

**Each request's prompt is its script** (for a chat request, the last message's content), so requests that run at
the same time each play their own: a JSON list of steps, played in order::

    ["piece", "text"]         a piece of generated text (one token)
    ["pieces", 3]             that many pieces: "t1 ", "t2 ", "t3 "
    ["prompt", 1, 4]          prompt evaluation progress: 1 batch of 4
    ["sleep", 0.5]            time passes; a cancel, a pause or a shutdown is noticed meanwhile
    ["wait_for", "/tmp/go"]   time passes, as in sleep, until that file exists (a test's gate for exact timing)
    ["stall", 5]              the engine hangs and notices nothing (a kill ends it)
    ["threads"]               a piece "threads=N": the thread count the engine was last given
    ["fail", "too_long", "…"] the engine raises the error of that code
    ["exit", 3]               the worker process exits with that code (an engine abort)

A prompt that is not such a list is one piece: the prompt itself. The generation ends with "stop" after the last
step, or with "length" once it has ``max_tokens`` pieces; usage counts the steps as prompt tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.backends.base import (
    Backend,
    GenerationEvent,
    GenerationTask,
    ModelInfo,
    Piece,
    PromptProgress,
    SequenceBatch,
)
from appliance.backends.interleave import InterleavedBatch
from appliance.backends.probe import Footprint, MiB, Probe
from appliance.backends.text import Clock
from appliance.errors import ModelError, UnsupportedArchitecture, error_from_code

if TYPE_CHECKING:
    from appliance.backends.base import EngineSettings
    from appliance.catalog.entry import ModelEntry

MODEL_KEYS = ("load_seconds", "load_error", "load_exit", "architecture", "footprint_mib")
POLL = 0.01  # seconds between looks at should_stop during a sleep step


def read_model(path: Path) -> dict[str, Any]:
    """The model file's settings; ModelError naming the file when it is not a JSON object of known keys."""
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a fake model (a JSON object): {exc}") from None
    if not isinstance(model, dict) or set(model) - set(MODEL_KEYS):
        raise ModelError(f"{path}: a fake model is a JSON object of {', '.join(MODEL_KEYS)}")
    return model


def script(*steps: list[Any]) -> str:
    """The prompt that plays these steps: ``script(["piece", "a"], ["sleep", 1])``."""
    return json.dumps(list(steps))


def parse_script(text: str) -> list[list[Any]]:
    try:
        steps = json.loads(text)
    except ValueError:
        return [["piece", text]]
    if not isinstance(steps, list) or not all(isinstance(s, list) and s and isinstance(s[0], str) for s in steps):
        return [["piece", text]]
    return steps


class _Stop(Exception):
    """should_stop() said yes during a sleep or wait_for step."""


def _pass_time(until: Callable[[], bool], should_stop: Callable[[], bool], batched: bool) -> Iterator[None]:
    """Time passes until ``until()``, should_stop looked at every POLL; batched, the other requests take their turns
    meanwhile (a None each POLL)."""
    while not until():
        if should_stop():
            raise _Stop
        time.sleep(POLL)
        if batched:
            yield None


class FakeProbe(Probe):
    def check(self, entry: ModelEntry) -> None:
        architecture = read_model(entry.path).get("architecture")
        if architecture is not None:
            raise UnsupportedArchitecture(f"{entry.path.name}: architecture {architecture!r} is not supported by "
                                          f"the fake engine")

    def footprint(self, entry: ModelEntry, settings: EngineSettings, margin: int) -> Footprint | None:
        self.check(entry)
        mib = read_model(entry.path).get("footprint_mib")
        if mib is None:
            return None
        # all of it the engine's own memory, freed by an unload (no file pages); per slot, like a KV cache
        return Footprint(model_id=entry.id, weights=0, kv_cache=int(mib * MiB) * settings.parallel, compute=0,
                         margin=margin)

    def facts(self, entry: ModelEntry) -> dict[str, Any]:
        self.check(entry)
        return {"architecture": "fake"}


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.threads = settings.threads
        self._entry: ModelEntry | None = None
        self._batch: InterleavedBatch | None = None

    def load(self, entry: ModelEntry) -> ModelInfo:
        model = read_model(entry.path)
        time.sleep(float(model.get("load_seconds", 0)))
        if "load_exit" in model:
            raise SystemExit(int(model["load_exit"]))
        if "load_error" in model:
            code, message = model["load_error"]
            raise error_from_code(code, f"model '{entry.id}': {message}")
        self._entry = entry
        return ModelInfo(id=entry.id, context_size=self.settings.context_size, chat_template="fake",
                         slots=self.settings.parallel)

    def batch(self) -> SequenceBatch | None:
        if self.settings.parallel == 1 or self._entry is None:
            return None
        if self._batch is None:
            self._batch = InterleavedBatch(lambda task, stop: self._steps(task, stop, batched=True),
                                           self.settings.parallel)
        return self._batch

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def close(self) -> None:
        self._entry, self._batch = None, None

    def generate(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        for event in self._steps(task, should_stop, batched=False):
            if event is not None:
                yield event

    def _steps(self, task: GenerationTask, should_stop: Callable[[], bool],
               batched: bool) -> Iterator[GenerationEvent | None]:
        """The script's events; batched, a sleep step gives the other requests their turns (None: nothing yet)."""
        if self._entry is None:
            raise ModelError("no model is loaded")
        text = task.prompt if task.messages is None else task.messages[-1].content
        steps = parse_script(text or "")
        max_tokens = task.params.max_tokens or self.settings.context_size
        clock, pieces, finish = Clock(), [], "stop"
        try:
            for step in steps:
                for event in self._play(step, should_stop, batched):
                    if event is None:
                        yield None
                        continue
                    if isinstance(event, Piece):
                        clock.token()
                        pieces.append(event.text)
                    yield event
                    if should_stop():
                        return
                    if len(pieces) >= max_tokens:
                        finish = "length"
                        break
                if finish == "length":
                    break
        except _Stop:
            return
        yield clock.completion("".join(pieces), finish, len(steps), len(pieces), self._entry.id)

    def _play(self, step: list[Any], should_stop: Callable[[], bool],
              batched: bool) -> Iterator[GenerationEvent | None]:
        match step:
            case ["piece", str(text)]:
                yield Piece(text)
            case ["pieces", int(n)]:
                yield from (Piece(f"t{i} ") for i in range(1, n + 1))
            case ["prompt", int(done), int(total)]:
                yield PromptProgress(done, total)
            case ["sleep", int(seconds) | float(seconds)]:
                deadline = time.monotonic() + seconds
                yield from _pass_time(lambda: time.monotonic() >= deadline, should_stop, batched)
            case ["wait_for", str(path)]:
                yield from _pass_time(Path(path).exists, should_stop, batched)
            case ["stall", int(seconds) | float(seconds)]:
                time.sleep(seconds)
            case ["threads"]:
                yield Piece(f"threads={self.threads}")
            case ["fail", str(code), str(message)]:
                raise error_from_code(code, message)
            case ["exit", int(code)]:
                raise SystemExit(code)
            case _:
                raise ModelError(f"the fake engine cannot play the step {step!r}")
