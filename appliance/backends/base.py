"""The interface every text engine implements.

A backend lives inside the worker child process and serves one loaded model at a time. It knows nothing about
MQTT, HTTP or queues: it loads a file, generates text pieces for one request at a time and closes. What the parent
may learn about a model file without the engine is its probe's job (probe.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.errors import ApplianceError
from appliance.messages import message
from appliance.protocol import Completion, Message, SamplingParams
from appliance.structured import StructuredOutput
from appliance.tools import ToolUse

if TYPE_CHECKING:
    from appliance.catalog.entry import ModelEntry
    from appliance.config.schema import WorkerConfig


@dataclass(frozen=True)
class EngineSettings:
    """What every backend needs from the ``[worker]`` config section."""

    threads: int
    context_size: int
    batch_size: int
    mmap: bool = True
    rwkv_strategy: str = "cpu fp32i8"
    parallel: int = 1  # sequences decoded in one batch (llama.cpp only; the guard may lower it per load)
    flash_attention: bool = False  # llama.cpp only

    @classmethod
    def from_config(cls, worker: WorkerConfig) -> EngineSettings:
        """The settings of ``[worker]``, with ``threads = 0`` resolved to this machine's physical cores."""
        return cls(threads=worker.threads or physical_cores(), context_size=worker.context_size,
                   batch_size=worker.batch_size, mmap=worker.mmap, rwkv_strategy=worker.rwkv_strategy,
                   parallel=worker.parallel, flash_attention=worker.flash_attention)


def physical_cores() -> int:
    import psutil
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@message
class GenerationTask:
    """One request, as the engine sees it: text or messages, and resolved sampling settings."""

    prompt: str | None
    messages: tuple[Message, ...] | None
    params: SamplingParams  # max_tokens already resolved (never None here)
    stream: bool = True  # False: nobody reads pieces before the end, so the worker need not send them
    structured: StructuredOutput | None = None  # the answer must follow this (backends with grammars only)
    tools: ToolUse | None = None  # functions the model may call (chat templates that support tools only)


@message
class Piece:
    """A piece of generated text, ready to send (never splits a UTF-8 character or a stop sequence)."""

    text: str


@message
class PromptProgress:
    """Prompt evaluation advanced; lets the parent tell a long prompt from a stuck worker."""

    done: int
    total: int


@message
class ModelInfo:
    id: str
    context_size: int
    chat_template: str  # "embedded" or the catalog's named template
    slots: int = 1  # requests the engine generates at once with this model (worker.parallel, or fewer)


GenerationEvent = Piece | PromptProgress | Completion


@message
class SequenceEvent:
    """What happened to one request of a batch in a step: an event, or the error that ended it."""

    key: int
    event: GenerationEvent | ApplianceError


class SequenceBatch(ABC):
    """Several requests generated together (continuous batching): requests join and leave between steps, and one
    :meth:`step` advances every one of them. The worker calls it from one thread, reading its pipe between steps."""

    slots: int  # requests it holds at once

    @abstractmethod
    def join(self, key: int, task: GenerationTask) -> None:
        """Start request ``key`` at the next step; raises ApplianceError (TooLong, BadRequest...) if it cannot."""

    @abstractmethod
    def leave(self, key: int) -> None:
        """Drop request ``key`` (cancelled) and free what it held; nothing for a key it does not hold."""

    @abstractmethod
    def step(self) -> list[SequenceEvent]:
        """Advance every request by one token (or one prompt chunk). A request ends with its Completion or an
        error and has then left the batch."""

    @property
    @abstractmethod
    def keys(self) -> list[int]:
        """The requests in the batch, in the order they joined."""

    def alone(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        """One request through an empty batch, yielding what :meth:`Backend.generate` yields (a backend whose model
        decodes in a batch serves ``generate`` this way); the error that ends it is raised."""
        key = 0
        self.join(key, task)
        try:
            while key in self.keys:
                if should_stop():
                    return
                for event in self.step():
                    if isinstance(event.event, ApplianceError):
                        raise event.event
                    yield event.event
        finally:
            self.leave(key)


class Backend(ABC):
    """An inference engine. Implementations import their engine lazily, in :meth:`load`."""

    #: registry name, used in catalog entries (``backend = "llama_cpp"``)
    name: str = ""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    @abstractmethod
    def load(self, entry: ModelEntry) -> ModelInfo:
        """Load the model file (already digest-checked and probed). Raises ModelError with a reason."""

    @abstractmethod
    def generate(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        """Yield pieces, then exactly one :class:`~appliance.protocol.Completion`.

        ``should_stop`` is polled between prompt batches and between tokens; when it returns True the generator
        ends early without a Completion. Raises TooLong when the prompt does not fit the context.
        """

    def batch(self) -> SequenceBatch | None:
        """The loaded model's batch when it generates several requests at once (``ModelInfo.slots`` > 1); None:
        one request at a time, through :meth:`generate`."""
        return None

    def set_threads(self, threads: int) -> None:  # noqa: B027 - engines without a thread knob ignore it
        """Use this many threads from the next token on (the supervisor slows a hot board down)."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to release need not override it
        """Release the model. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
