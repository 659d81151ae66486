"""What every text backend does the same way around its engine: the token budget, the seed, the stop sequences,
the timings of the Completion, and turning generated token bytes into text that is safe to send.

Text leaves the worker only when it can no longer change: never half of a UTF-8 character (one token is often a
single byte of one), and never the first characters of what may turn out to be a stop sequence, since a stop
sequence is cut from the answer and must not have been streamed already.
"""

from __future__ import annotations

import codecs
import random
import time
from typing import TYPE_CHECKING

from appliance.errors import TooLong
from appliance.protocol import Completion, SamplingParams, Usage

if TYPE_CHECKING:
    from appliance.backends.base import GenerationTask


def token_budget(n_prompt: int, n_ctx: int, task: GenerationTask) -> int:
    """How many tokens may be generated: ``max_tokens``, cut to what the context leaves after the prompt. TooLong
    (naming the prompt or the messages) when the prompt does not fit at all."""
    if n_prompt >= n_ctx:
        raise TooLong(f"prompt is {n_prompt} tokens; the context window is {n_ctx} tokens (worker.context_size)",
                      param="prompt" if task.messages is None else "messages")
    return min(task.params.max_tokens or n_ctx, n_ctx - n_prompt)


def seed_of(params: SamplingParams) -> int:
    """The request's seed, or a fresh random one (so two unseeded requests differ)."""
    return params.seed if params.seed is not None else random.SystemRandom().randint(0, 2**32 - 1)


def stops_of(params: SamplingParams, template_stop: tuple[str, ...]) -> tuple[str, ...]:
    """The request's stop sequences, then the template's, each once."""
    return tuple(dict.fromkeys(params.stop + template_stop))


class Clock:
    """Times one generation for its Completion: from the start (prompt included) to the first token, and the
    tokens per second of sampling alone."""

    def __init__(self) -> None:
        self.started = self.sampling_started = time.perf_counter()
        self.first_token_at: float | None = None

    def sampling(self) -> None:
        """The prompt is evaluated; sampling starts now."""
        self.sampling_started = time.perf_counter()

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def completion(self, text: str, finish_reason: str, n_prompt: int, n_generated: int, model: str) -> Completion:
        ended = time.perf_counter()
        first = self.first_token_at or ended
        return Completion(text=text, finish_reason=finish_reason, usage=Usage(n_prompt, n_generated),
                          ttft_ms=(first - self.started) * 1000.0,
                          tokens_per_s=n_generated / max(ended - self.sampling_started, 1e-9), model=model)


class TextStream:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False  # a stop sequence was found; ``text`` ends just before it

    def push(self, data: bytes) -> None:
        self.text += self._decoder.decode(data)

    @property
    def inside_character(self) -> bool:
        """The last bytes pushed are the start of a character still incomplete."""
        return bool(self._decoder.getstate()[0])

    def find_stop(self) -> bool:
        """Cut the text at the first stop sequence, if one has appeared; True when it has."""
        if self.stops:
            window = max(0, self.sent - self._longest_stop)
            hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def release(self) -> str:
        """Text that can no longer become part of a stop sequence and has not been released yet."""
        ready = len(self.text) - held_back(self.text, self.stops)
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:ready], ready
        return piece

    def finish(self) -> str:
        """Everything not released yet, once generation has ended (an incomplete final character is dropped)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop sequence."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold
