"""The messages that cross between processes and threads: small frozen dataclasses, matched by type.

    parent -> inference worker    Load | Unload | Generate | Cancel | Pause | Resume | Throttle | Shutdown
    inference worker -> parent    Ready | Loaded | Unloaded | LoadFailed | Progress | Chunk | Done | Failed | Stopped
    parent -> ONNX worker         Infer | Shutdown
    ONNX worker -> parent         Ready | Inferred | Failed
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
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError
from appliance.protocol import Completion

if TYPE_CHECKING:
    from appliance.backends.base import GenerationTask, ModelInfo
    from appliance.catalog.entry import ModelEntry


# -- parent -> a worker --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Load:
    entry: ModelEntry


@dataclass(frozen=True, slots=True)
class Unload:
    pass


@dataclass(frozen=True, slots=True)
class Generate:
    key: int
    task: GenerationTask


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop job ``key`` early; a cancel for a job that is no longer running needs nothing."""

    key: int


@dataclass(frozen=True, slots=True)
class Pause:
    """Hold every generation between tokens until Resume (the board is too hot)."""


@dataclass(frozen=True, slots=True)
class Resume:
    pass


@dataclass(frozen=True, slots=True)
class Throttle:
    threads: int
    token_delay: float  # seconds of rest after each token


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Infer:
    """Run a tensor model on arrays already checked against its declared inputs."""

    key: int
    entry: ModelEntry
    arrays: dict[str, Any]


# -- a worker -> parent --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Loaded:
    info: ModelInfo


@dataclass(frozen=True, slots=True)
class Unloaded:
    pass


@dataclass(frozen=True, slots=True)
class LoadFailed:
    model_id: str
    error: ApplianceError
    still_loaded: str | None = None  # refused before the loaded model was closed: this one still serves


@dataclass(frozen=True, slots=True)
class Progress:
    """Job ``key`` is alive: prompt batches evaluated (``done`` of ``total``), or, with total 0, tokens generated
    so far by a generation that streams nothing."""

    key: int
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of job ``key``'s text, numbered from 1 (streamed requests only)."""

    key: int
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    key: int
    completion: Completion


@dataclass(frozen=True, slots=True)
class Failed:
    key: int
    error: ApplianceError


@dataclass(frozen=True, slots=True)
class Stopped:
    """Job ``key`` ended early because the parent cancelled it (the parent knows why)."""

    key: int


@dataclass(frozen=True, slots=True)
class Inferred:
    key: int
    outputs: dict[str, Any]
    milliseconds: float


@dataclass(frozen=True, slots=True)
class Exited:
    code: int | None  # negative: killed by that signal


# -- inside the parent ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Crashed:
    key: int
    how: str  # "killed by SIGKILL", "exit code 3"


@dataclass(frozen=True, slots=True)
class Abandoned:
    """The appliance is shutting down before job ``key`` finished (MQTT leaves it unacked for redelivery)."""

    key: int


#: what a job's sink receives: pieces, then exactly one of the others
JobEvent = Chunk | Done | Failed | Abandoned
#: what the inference worker sends
WorkerMessage = Ready | Loaded | Unloaded | LoadFailed | Progress | Chunk | Done | Failed | Stopped | Exited
