"""The Wyoming conversation agent's parts that are not the server: reading events from an untrusted peer with limits,
the conversations Home Assistant continues, and the sentences a refusal is spoken as.

Wyoming's own ``async_read_event`` trusts its peer (a header that is not an object, a missing ``type`` or a huge
``data_length`` raise or allocate as the peer says); the appliance's listener reads the same wire format with
bounds and turns anything else into a :class:`WireProblem`, answered with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wyoming.event import Event

MAX_HEADER = 64 * 1024  # bytes of the JSON header line (the StreamReader's limit)
MAX_DATA = 64 * 1024  # bytes of the additional data a header announces
MAX_PAYLOAD = 64 * 1024  # a handle program takes no audio; a payload is read (bounded) and dropped
MAX_TEXT = 4000  # characters of one transcript


class WireProblem(Exception):
    """The peer sent something that is not a Wyoming event within our limits."""


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, or None at the end of the stream; raises WireProblem on garbage."""
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        raise WireProblem(f"event header longer than {MAX_HEADER} bytes") from None
    if not line or not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise WireProblem("event header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireProblem("event header must be a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise WireProblem("event 'data' must be a JSON object")
    data_length = _length(header, "data_length", MAX_DATA)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD)
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise WireProblem("event data must be a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except ValueError:
        raise WireProblem("event data is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload)


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise WireProblem(f"'{key}' must be an integer from 0 to {limit}")
    return value


@dataclass
class _Conversation:
    used: float
    turns: deque[tuple[str, str]]  # (question, answer) pairs


class Conversations:
    """Earlier turns per Home Assistant ``conversation_id``, bounded in turns, in conversations and in time."""

    def __init__(self, turns: int, *, limit: int = 64, idle_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.turns, self.limit, self.idle_seconds, self._clock = turns, limit, idle_seconds, clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()

    def history(self, conversation_id: str | None) -> list[tuple[str, str]]:
        self._expire()
        item = self._items.get(conversation_id) if conversation_id else None
        return list(item.turns) if item else []

    def add(self, conversation_id: str | None, question: str, answer: str) -> None:
        if not conversation_id or self.turns == 0:
            return
        item = self._items.pop(conversation_id, None) or _Conversation(0.0, deque(maxlen=self.turns))
        item.used = self._clock()
        item.turns.append((question, answer))
        self._items[conversation_id] = item
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def _expire(self) -> None:
        horizon = self._clock() - self.idle_seconds
        for key in [k for k, v in self._items.items() if v.used < horizon]:
            del self._items[key]


DEFAULT_SYSTEM_PROMPT = ("You are a helpful voice assistant running offline on a small device. Answer in one or two "
                         "short sentences, in the language of the question, without lists or markup: your answer "
                         "will be spoken.")

#: what a refusal is spoken as, by error code, in the advertised languages
_REFUSALS = {
    "busy": {"en": "I am busy with other questions. Please ask again in a moment.",
             "es": "Estoy ocupado con otras preguntas. Vuelve a preguntar en un momento.",
             "zh": "我正在回答其他问题，请稍后再问。"},
    "thermal": {"en": "I am too hot to answer right now. Please ask again when I have cooled down.",
                "es": "Estoy demasiado caliente para responder ahora. Pregunta de nuevo cuando me enfríe.",
                "zh": "设备温度过高，暂时无法回答，请稍后再问。"},
    "memory": {"en": "I am short of memory right now. Please ask again in a moment.",
               "es": "Ahora me falta memoria. Vuelve a preguntar en un momento.",
               "zh": "设备内存不足，请稍后再问。"},
    "bad_request": {"en": "I did not understand the question.",
                    "es": "No entendí la pregunta.",
                    "zh": "我没有听懂这个问题。"},
    "": {"en": "Sorry, I cannot answer right now.",
         "es": "Lo siento, no puedo responder ahora.",
         "zh": "抱歉，我现在无法回答。"},
}


def guess_language(text: str, default: str = "en") -> str:
    """The transcript's language when the client does not say (Home Assistant does not): enough for a refusal."""
    if any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in text):
        return "zh"
    if any(c in "¿¡ñáéíóúü" for c in text.lower()):
        return "es"
    return default


def refusal(code: str, language: str) -> str:
    sentences = _REFUSALS.get(code, _REFUSALS[""])
    return sentences.get(language.split("-")[0].split("_")[0].lower(), sentences["en"])
