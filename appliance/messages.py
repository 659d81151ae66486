"""The messages that cross between processes and threads: small frozen dataclasses, matched by type.

    parent -> inference worker    Load | Unload | Generate | Cancel | Pause | Resume | Throttle | Shutdown
    inference worker -> parent    Ready | Loaded | Unloaded | LoadFailed | Progress | Chunk | Done | Failed | Stopped
                                  | StepReport (the Progress, Chunk, Done and Failed of one batch step, in one message)
    parent -> ONNX worker         Infer | Embed | Shutdown
    ONNX worker -> parent         Ready | Inferred | Embedded | Failed
    a worker's handle -> parent   Exited (the child process is gone; its reader thread says so last)
    worker slot -> scheduler      Crashed (the worker died while a job ran on it)
    scheduler -> a job's sink     Chunk | Done | Failed | Abandoned

Every message about a job carries the job's key, so the messages of several jobs may interleave. Errors travel as
the exceptions themselves (an :class:`~appliance.errors.ApplianceError` pickles with its code, message and param),
never as wire dicts; the transports turn them into JSON at the edge (protocol.py). ``Chunk``, ``Done`` and ``Failed``
go from the worker to a job's sink unchanged: the worker and the transports speak one vocabulary.

Request text crosses the pipe inside ``Generate`` and ``Chunk`` but is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform

from appliance.errors import ApplianceError
from appliance.protocol import Completion

if TYPE_CHECKING:
    from appliance.backends.base import GenerationTask, ModelInfo
    from appliance.catalog.entry import ModelEntry

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def message(cls: type[T]) -> type[T]:
    """Make ``cls`` a message: a frozen dataclass with slots (small, immutable, matched by type and fields)."""
    return dataclass(frozen=True, slots=True)(cls)


# -- parent -> a worker --------------------------------------------------------------------------------------------

@message
class Load:
    entry: ModelEntry
    slots: int = 1  # requests the model may generate at once (worker.parallel, or fewer when memory is short)


@message
class Unload:
    pass


@message
class Generate:
    key: int
    task: GenerationTask


@message
class Cancel:
    """Stop job ``key`` early; a cancel for a job that is no longer running needs nothing."""

    key: int


@message
class Pause:
    """Hold every generation between tokens until Resume (the board is too hot)."""


@message
class Resume:
    pass


@message
class Throttle:
    threads: int
    token_delay: float  # seconds of rest after each token


@message
class Shutdown:
    pass


@message
class Infer:
    """Run a tensor model on arrays already checked against its declared inputs."""

    key: int
    entry: ModelEntry
    arrays: dict[str, Any]


@message
class Embed:
    """Embed texts with an embedding model (the worker tokenizes them: a text over the model's limit fails the
    request with BadRequest, or is cut to the limit when ``truncate``)."""

    key: int
    entry: ModelEntry
    texts: tuple[str, ...]
    truncate: bool


# -- a worker -> parent --------------------------------------------------------------------------------------------

@message
class Ready:
    pid: int


@message
class Loaded:
    info: ModelInfo


@message
class Unloaded:
    pass


@message
class LoadFailed:
    model_id: str
    error: ApplianceError
    still_loaded: str | None = None  # refused before the loaded model was closed: this one still serves


@message
class Progress:
    """Job ``key`` is alive: prompt batches evaluated (``done`` of ``total``), or, with total 0, tokens generated
    so far by a generation that streams nothing."""

    key: int
    done: int
    total: int


@message
class Chunk:
    """A piece of job ``key``'s text, numbered from 1 (streamed requests only)."""

    key: int
    seq: int
    text: str


@message
class Done:
    key: int
    completion: Completion


@message
class Failed:
    key: int
    error: ApplianceError


@message
class Stopped:
    """Job ``key`` ended early because the parent cancelled it (the parent knows why)."""

    key: int


@message
class StepReport:
    """What one step of a batch produced for its jobs (Progress, Chunk, Done, Failed), in the order it happened.

    With ``worker.parallel`` > 1 a step yields a piece for each streamed sequence; one pipe message for all of them
    instead of one each saves a pickle and a write in the worker and a wake-up of the parent's reader and scheduler
    threads per piece: CPU the engine's threads share on a 2-core board.
    """

    reports: tuple[Progress | Chunk | Done | Failed, ...]


@message
class Inferred:
    key: int
    outputs: dict[str, Any]
    milliseconds: float


@message
class Embedded:
    key: int
    vectors: list[list[float]]  # one L2-normalised vector per text, in the request's order
    tokens: int  # tokens the model read, special tokens included (what `usage` reports)
    milliseconds: float


@message
class Exited:
    code: int | None  # negative: killed by that signal


# -- inside the parent ---------------------------------------------------------------------------------------------

@message
class Crashed:
    key: int
    how: str  # "killed by SIGKILL", "exit code 3"


@message
class Abandoned:
    """The appliance is shutting down before job ``key`` finished (MQTT leaves it unacked for redelivery)."""

    key: int


#: what a job's sink receives: pieces, then exactly one of the others
JobEvent = Chunk | Done | Failed | Abandoned
#: what the inference worker sends
WorkerMessage = (Ready | Loaded | Unloaded | LoadFailed | Progress | Chunk | Done | Failed | Stopped | StepReport
                 | Exited)
