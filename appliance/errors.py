"""One exception tree for the whole appliance.

Every error that can reach a requester carries a stable ``code``: the same string is sent in MQTT error replies
(``{"id", "error": {"code", "message"}}``) and in OpenAI-style HTTP error bodies, and is the label of the
``appliance_errors_total`` metric. The codes are part of the protocol; see ``docs/protocol.md``.
"""

from __future__ import annotations

from http import HTTPStatus


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose.

    A subclass names its code and HTTP status as class keywords (``class Busy(ApplianceError, code="busy",
    status=503)``); one that names a code is one a requester can receive, and is listed in :data:`ERROR_CODES`.
    """

    code = "internal"
    http_status: int = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init_subclass__(cls, *, code: str | None = None, status: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
            _BY_CODE[code] = cls
        if status is not None:
            cls.http_status = status

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the request field (or config key) the error is about, when there is one
        self.param = param

    def to_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.param:
            body["param"] = self.param
        return body


_BY_CODE: dict[str, type[ApplianceError]] = {}


class ConfigError(ApplianceError, ValueError):
    """The configuration is invalid; ``problems`` lists every bad key."""

    code = "config"  # an operator's error, never a requester's: not in ERROR_CODES

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class BadRequest(ApplianceError, ValueError, code="bad_request", status=HTTPStatus.BAD_REQUEST):
    """The request is malformed: bad JSON, a missing field, a wrong type or a value out of range."""


class Unauthorized(ApplianceError, code="unauthorized", status=HTTPStatus.UNAUTHORIZED):
    """The HTTP request lacks the configured API key."""


class Moderated(ApplianceError, code="moderated", status=HTTPStatus.BAD_REQUEST):
    """The moderation filter refused the request's text; ``param`` names the prompt or the message."""


class UnknownModel(ApplianceError, LookupError, code="unknown_model", status=HTTPStatus.NOT_FOUND):
    """The request names a model that is not in the catalog."""


class Busy(ApplianceError, code="busy", status=HTTPStatus.SERVICE_UNAVAILABLE):
    """The queue is full; the request was refused at once rather than left waiting."""


class TooLong(ApplianceError, code="too_long", status=HTTPStatus.BAD_REQUEST):
    """The prompt does not fit in the model's context window."""


class RequestTimeout(ApplianceError, TimeoutError, code="timeout", status=HTTPStatus.GATEWAY_TIMEOUT):
    """The request did not finish within the configured request timeout."""


# 499 is nginx's "client closed request"; only seen when a request is cancelled from another connection.
class Cancelled(ApplianceError, code="cancelled", status=499):
    """The request was cancelled by its id, or its HTTP client went away."""


class ModelError(ApplianceError, code="model_error"):
    """The model could not be loaded or failed while generating (bad file, digest mismatch, engine error)."""


class ChecksumMismatch(ModelError):
    """A model file's sha256 differs from its catalog entry."""


class UnsupportedArchitecture(ModelError, code="unsupported_architecture", status=HTTPStatus.UNPROCESSABLE_ENTITY):
    """The model's architecture is not one the engine can run (OPT, for one, is not in llama.cpp)."""


class BackendUnavailable(ModelError, ImportError):
    """The inference engine a model needs is not installed (for example the ``llama`` extra)."""


class WorkerCrashed(ApplianceError, code="worker_crashed", status=HTTPStatus.BAD_GATEWAY):
    """The inference child process died while it held the request."""


class InsufficientMemory(ApplianceError, code="memory", status=HTTPStatus.SERVICE_UNAVAILABLE):
    """Not enough memory: a model load was refused, or memory ran critically low and the generation was stopped."""


class Overheated(ApplianceError, code="thermal", status=HTTPStatus.SERVICE_UNAVAILABLE):
    """The board is above its hard temperature limit; new requests are refused until it cools down."""


class Internal(ApplianceError, code="internal"):
    """An unexpected failure inside the appliance; the message never contains request text."""


#: Every code a requester can receive, with a one-line meaning (rendered into docs/protocol.md).
ERROR_CODES: dict[str, str] = {code: (cls.__doc__ or "").strip().splitlines()[0] for code, cls in _BY_CODE.items()}


def error_from_code(code: str, message: str, param: str | None = None) -> ApplianceError:
    """An error of the class that carries ``code`` (Internal for a code no class has)."""
    return _BY_CODE.get(code, Internal)(message, param=param)
