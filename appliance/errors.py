"""One exception tree for the whole appliance.

Every error that can reach a requester carries a stable ``code``: the same string is sent in MQTT error replies
(``{"id", "error": {"code", "message"}}``) and in OpenAI-style HTTP error bodies, and is the label of the
``appliance_errors_total`` metric. The codes are part of the protocol; see ``docs/protocol.md``.
"""

from __future__ import annotations

from http import HTTPStatus


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    code = "internal"
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the request field (or config key) the error is about, when there is one
        self.param = param

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.param:
            body["param"] = self.param
        return body


class ConfigError(ApplianceError, ValueError):
    """The configuration is invalid; ``problems`` lists every bad key."""

    code = "config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class BadRequest(ApplianceError, ValueError):
    """The request is malformed: bad JSON, a missing field, a wrong type or a value out of range."""

    code = "bad_request"
    http_status = HTTPStatus.BAD_REQUEST


class Unauthorized(ApplianceError):
    """The HTTP request lacks the configured API key."""

    code = "unauthorized"
    http_status = HTTPStatus.UNAUTHORIZED


class Moderated(ApplianceError):
    """The moderation filter refused the request's text; ``param`` names the prompt or the message."""

    code = "moderated"
    http_status = HTTPStatus.BAD_REQUEST


class UnknownModel(ApplianceError, LookupError):
    """The request names a model that is not in the catalog."""

    code = "unknown_model"
    http_status = HTTPStatus.NOT_FOUND


class Busy(ApplianceError):
    """The queue is full; the request was refused at once rather than left waiting."""

    code = "busy"
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class TooLong(ApplianceError):
    """The prompt does not fit in the model's context window."""

    code = "too_long"
    http_status = HTTPStatus.BAD_REQUEST


class RequestTimeout(ApplianceError, TimeoutError):
    """The request did not finish within the configured request timeout."""

    code = "timeout"
    http_status = HTTPStatus.GATEWAY_TIMEOUT


class Cancelled(ApplianceError):
    """The request was cancelled by its id, or its HTTP client went away."""

    code = "cancelled"
    # nginx's "client closed request"; only seen when a request is cancelled from another connection.
    http_status = 499


class ModelError(ApplianceError):
    """The model could not be loaded or failed while generating (bad file, digest mismatch, engine error)."""

    code = "model_error"


class ChecksumMismatch(ModelError):
    """A model file's sha256 differs from its catalog entry."""


class UnsupportedArchitecture(ModelError):
    """The model's architecture is not one the engine can run (OPT, for one, is not in llama.cpp)."""

    code = "unsupported_architecture"
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


class BackendUnavailable(ModelError, ImportError):
    """The inference engine a model needs is not installed (for example the ``llama`` extra)."""


class WorkerCrashed(ApplianceError):
    """The inference child process died while it held the request."""

    code = "worker_crashed"
    http_status = HTTPStatus.BAD_GATEWAY


class InsufficientMemory(ApplianceError):
    """Not enough memory: a model load was refused, or memory ran critically low and the generation was stopped."""

    code = "memory"
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class Overheated(ApplianceError):
    """The board is above its hard temperature limit; new requests are refused until it cools down."""

    code = "thermal"
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class Internal(ApplianceError):
    """An unexpected failure inside the appliance; the message never contains request text."""


#: Every code a requester can receive, with a one-line meaning (rendered into docs/protocol.md).
ERROR_CODES: dict[str, str] = {
    cls.code: (cls.__doc__ or "").strip().splitlines()[0]
    for cls in (BadRequest, Unauthorized, Moderated, UnknownModel, Busy, TooLong, RequestTimeout, Cancelled,
                ModelError, UnsupportedArchitecture, WorkerCrashed, InsufficientMemory, Overheated, Internal)
}

_BY_CODE: dict[str, type[ApplianceError]] = {
    cls.code: cls for cls in (BadRequest, Unauthorized, Moderated, UnknownModel, Busy, TooLong, RequestTimeout,
                              Cancelled, ModelError, UnsupportedArchitecture, WorkerCrashed, InsufficientMemory,
                              Overheated, Internal)
}


def error_from_code(code: str, message: str, param: str | None = None) -> ApplianceError:
    """Rebuild an error that crossed a process boundary as ``(code, message)``."""
    return _BY_CODE.get(code, Internal)(message, param=param)
