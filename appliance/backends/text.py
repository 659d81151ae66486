"""Turning generated token bytes into text that is safe to send, shared by the text backends.

Text leaves the worker only when it can no longer change: never half of a UTF-8 character (one token is often a
single byte of one), and never the first characters of what may turn out to be a stop sequence, since a stop
sequence is cut from the answer and must not have been streamed already.
"""

from __future__ import annotations

import codecs


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
