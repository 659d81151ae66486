"""`appliance ask --wyoming`: one Assist turn as Home Assistant takes it (describe, then a transcript on a new
connection, reading to `handled` or `not-handled`), to check a device's conversation agent from a shell."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.handle import Handled, HandledChunk, NotHandled
from wyoming.info import Describe, Info

from appliance.cli.client import Answer


async def _ask(host: str, port: int, text: str, on_delta: Callable[[str], None], timeout: float) -> Answer:
    async with AsyncTcpClient(host, port, connect_timeout=5, read_timeout=5) as probe:
        await probe.write_event(Describe().event())
        info = await probe.read_event()
        if info is None or not Info.is_type(info.type) or not Info.from_event(info).handle:
            return Answer(error={"code": "bad_request", "message": f"{host}:{port} is not a Wyoming handle program"})
    async with AsyncTcpClient(host, port, connect_timeout=5, read_timeout=timeout) as client:
        await client.write_event(Transcript(text=text).event())
        while (event := await client.read_event()) is not None:
            if HandledChunk.is_type(event.type):
                on_delta(HandledChunk.from_event(event).text)
            elif Handled.is_type(event.type):
                return Answer(text=Handled.from_event(event).text or "", finish_reason="stop")
            elif NotHandled.is_type(event.type):
                return Answer(error={"code": "not_handled", "message": NotHandled.from_event(event).text})
            elif Error.is_type(event.type):
                return Answer(error={"code": event.data.get("code"), "message": event.data.get("text")})
    return Answer(error={"code": "internal", "message": "the connection closed before an answer"})


def ask_wyoming(host: str, port: int, text: str, *, on_delta: Callable[[str], None] = lambda s: None,
                timeout: float = 600) -> Answer:
    try:
        return asyncio.run(_ask(host, port, text, on_delta, timeout))
    except (OSError, TimeoutError) as exc:
        return Answer(error={"code": "internal", "message": f"{host}:{port}: {exc}"})
