"""A job (one accepted request on its way through the scheduler), where its output goes, and how its end is
reported: one final result or error to its sink, the metrics, and a log line that never holds request text."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.backends.base import GenerationTask
from appliance.config.schema import Config
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.protocol import Completion, GenerateRequest

log = logging.getLogger("appliance.scheduler")


class Sink(Protocol):
    """Where a job's output goes. Called on the scheduler thread; must not block."""

    def on_piece(self, job: Job, seq: int, text: str) -> None: ...
    def on_result(self, job: Job, completion: Completion) -> None: ...
    def on_error(self, job: Job, error: ApplianceError) -> None: ...
    def on_abandon(self, job: Job) -> None:
        """The appliance is shutting down before the job finished (MQTT leaves it unacked for redelivery)."""


@dataclass(eq=False)
class Job:
    key: int
    request: GenerateRequest
    model_id: str
    task: GenerationTask
    sink: Sink
    transport: str
    accepted: float
    deadline: float
    seq: int = 0
    started: float | None = None
    last_progress: float = 0.0
    stop_reason: ApplianceError | None = None  # set when a running job is being cancelled or timed out
    stop_deadline: float = 0.0
    finished: bool = False
    extra: dict = field(default_factory=dict)


class Reporter:
    """Delivers each job's end exactly once: to its sink, to the metrics and to the log."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.last_tokens_per_s = 0.0
        #: told of every error reply, e.g. the operator page's history; must not block
        self.error_listeners: list[Callable[[str, ApplianceError], None]] = []

    def record_error(self, transport: str, error: ApplianceError) -> None:
        """Count an error reply (also used by transports for errors raised before a job exists)."""
        self.metrics.requests.labels(transport, error.code).inc()
        self.metrics.errors.labels(error.code).inc()
        for listener in self.error_listeners:
            _call(listener, transport, error)

    def finish(self, job: Job, result: Completion | None, error: ApplianceError | None) -> None:
        job.finished = True
        elapsed = time.monotonic() - job.accepted
        self.metrics.duration.observe(elapsed)
        if result is not None:
            self.metrics.requests.labels(job.transport, "ok").inc()
            self.metrics.prompt_tokens.inc(result.usage.prompt_tokens)
            self.metrics.completion_tokens.inc(result.usage.completion_tokens)
            self.metrics.ttft.observe(result.ttft_ms / 1000.0)
            self.metrics.tokens_per_second.set(result.tokens_per_s)
            self.last_tokens_per_s = result.tokens_per_s
            log.info("request %r done in %.2f s: %d prompt + %d completion tokens, ttft %.0f ms, %.1f tok/s, %s",
                     job.request.id, elapsed, result.usage.prompt_tokens, result.usage.completion_tokens,
                     result.ttft_ms, result.tokens_per_s, result.finish_reason)
            if self.config.logging.log_prompts:
                log.debug("request %r prompt=%r messages=%r completion=%r", job.request.id, job.request.prompt,
                          job.request.messages, result.text)
            _call(job.sink.on_result, job, result)
        else:
            self.record_error(job.transport, error)
            log.info("request %r failed after %.2f s: %s", job.request.id, elapsed, error.code)
            _call(job.sink.on_error, job, error)

    @staticmethod
    def abandon(job: Job) -> None:
        if not job.finished:
            job.finished = True
            _call(job.sink.on_abandon, job)


def _call(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("reply sink failed")
