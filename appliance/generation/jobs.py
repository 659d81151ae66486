"""A job (one accepted request on its way through the scheduler), where its output goes, and how its end is
reported: one final result or error to its sink, the metrics, and a log line that never holds request text."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.backends.base import GenerationTask
from appliance.config.schema import Config
from appliance.errors import ApplianceError
from appliance.messages import Abandoned, Done, Failed, JobEvent
from appliance.metrics import Metrics
from appliance.protocol import Completion, GenerateRequest

log = logging.getLogger("appliance.scheduler")


class Sink(Protocol):
    """Where a job's output goes: Chunk events, then exactly one Done, Failed or Abandoned (appliance/messages.py).
    Called on the scheduler thread; must not block."""

    def send(self, job: Job, event: JobEvent) -> None: ...


@dataclass(frozen=True)
class Requester:
    """Who sent a request, as far as its transport can vouch for it; a cancel by id stops only the requests of the
    requester that sent the cancel. With accounts, the name the broker checked (the topic's last level, which the
    shipped ACL's %u pattern lets each account write only as itself); without, the reply destination: whoever can
    name it reads that request's replies anyway."""

    account: str | None = None
    reply_to: str | None = None


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
    requester: Requester | None = None  # None: only the job itself can be cancelled (HTTP, Wyoming: per connection)
    last_progress: float = 0.0
    stop_reason: ApplianceError | None = None  # set when a job is being cancelled, timed out or refused
    stop_deadline: float = 0.0
    finished: bool = False


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
            try:
                listener(transport, error)
            except Exception:
                log.exception("error listener failed")

    def record_outcome(self, transport: str, accepted: float, error: ApplianceError | None) -> None:
        """Count the reply to an accepted request, ok or an error, and its time since acceptance."""
        if error is None:
            self.metrics.requests.labels(transport, "ok").inc()
        else:
            self.record_error(transport, error)
        self.metrics.duration.observe(time.monotonic() - accepted)

    def finish(self, job: Job, result: Completion | ApplianceError) -> None:
        job.finished = True
        elapsed = time.monotonic() - job.accepted
        if isinstance(result, ApplianceError):
            self.record_outcome(job.transport, job.accepted, result)
            log.info("request %r failed after %.2f s: %s", job.request.id, elapsed, result.code)
            deliver(job, Failed(job.key, result))
            return
        self.record_outcome(job.transport, job.accepted, None)
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
        deliver(job, Done(job.key, result))

    @staticmethod
    def abandon(job: Job) -> None:
        if not job.finished:
            job.finished = True
            deliver(job, Abandoned(job.key))


def deliver(job: Job, event: JobEvent) -> None:
    """Hand an event to the job's sink; a sink that fails is logged, never allowed to stop the scheduler."""
    try:
        job.sink.send(job, event)
    except Exception:
        log.exception("reply sink failed")
