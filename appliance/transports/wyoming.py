"""Wyoming transport: the appliance as a conversation agent for Home Assistant's Assist (a Wyoming `handle` program).

    describe                        -> info (a handle program, its model, its languages)
    transcript {text, context?}     -> handled-start, handled-chunk..., handled {text, context}, handled-stop
                                       or not-handled {text} (busy, too hot ...: a sentence to speak)
    ping                            -> pong

Home Assistant probes with ``describe`` and a 1 s timeout, and opens a new connection for each turn, reading until
the first ``handled`` or ``not-handled``. The server runs on its own asyncio loop in one thread; a transcript becomes
an ordinary chat request on the scheduler's queue (limits, priorities, thermal and memory refusals included), and its
pieces come back through the loop, so ``describe`` is answered at once even while the model generates.

Wyoming has no credentials. The listener is on loopback unless the operator sets ``wyoming.allow_anonymous``
(checked at config load), and ``wyoming.allowed_clients`` can narrow who may connect. Transcript text is never
logged unless ``logging.log_prompts`` is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import uuid
from typing import Any

from wyoming.asr import Transcript
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Attribution, Describe, HandleModel, HandleProgram, Info
from wyoming.ping import Ping, Pong

from appliance import __version__
from appliance.config import Config
from appliance.errors import ApplianceError, BadRequest, Cancelled
from appliance.generation.jobs import Job
from appliance.generation.scheduler import Scheduler
from appliance.messages import Abandoned, Chunk, Done, Failed, JobEvent
from appliance.protocol import parse_generate
from appliance.transports.wyoming_talk import (
    DEFAULT_SYSTEM_PROMPT,
    MAX_HEADER,
    MAX_TEXT,
    Conversations,
    WireProblem,
    guess_language,
    read_event,
    refusal,
)

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 120.0  # seconds a connection may stay silent while nothing is being answered
ATTRIBUTION = Attribution(name="appliance", url="")


class AsyncSink:
    """A job's sink that hands its output to the asyncio loop (called on the scheduler thread; never blocks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[Chunk | Done | Failed] = asyncio.Queue()

    def send(self, job: Job, event: JobEvent) -> None:
        if isinstance(event, Abandoned):
            event = Failed(job.key, Cancelled("the appliance is shutting down"))
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            self.loop.call_soon_threadsafe(self.items.put_nowait, event)


class WyomingServer:
    def __init__(self, config: Config, scheduler: Scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        w = config.wyoming
        self.host, self.port = w.bind, w.port
        self.languages = [x.strip() for x in w.languages.split(",")]
        self.allowed = [ipaddress.ip_network(x.strip(), strict=False) for x in w.allowed_clients.split(",")
                        if x.strip()]
        self.conversations = Conversations(w.history_turns)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wyoming", daemon=True)
        self._closed = False

    # -- life cycle (service thread) ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (raises OSError when the address is taken), then serve on the loop's own thread."""
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._on_connection, self.host, self.port, limit=MAX_HEADER))
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread.start()
        log.info("Wyoming: conversation agent on tcp://%s:%d (languages %s)", self.host, self.port,
                 ",".join(self.languages))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            self._loop.close()
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # -- one connection (the loop's thread) --------------------------------------------------------------------

    def info(self) -> Info:
        model = self.config.wyoming.model or self.config.models.default
        description = "An offline language model answering in the device's languages"
        return Info(handle=[HandleProgram(
            name="appliance", attribution=ATTRIBUTION, installed=True, description=description, version=__version__,
            models=[HandleModel(name=model, attribution=ATTRIBUTION, installed=True, description=description,
                                version=__version__, languages=self.languages)],
            supports_handled_streaming=True)])

    def _allowed(self, peer: tuple[Any, ...] | None) -> bool:
        if not self.allowed:
            return True
        try:
            address = ipaddress.ip_address(peer[0]) if peer else None
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address is not None and any(address in net for net in self.allowed)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not self._allowed(peer) or len(self._connections) >= MAX_CONNECTIONS:
            log.warning("Wyoming: refused a connection from %s (%s)", peer[0] if peer else "?",
                        "not in wyoming.allowed_clients" if not self._allowed(peer) else "too many connections")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # a connection callback runs as a task
        self._connections.add(task)
        connection = _Connection(self, reader, writer)
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            await connection.close()


class _Connection:
    """One client: events are read one after another; a transcript is answered by a task of its own, so that a
    ``describe`` on the same connection is not held up by a generation."""

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self._write_lock = asyncio.Lock()
        self._answer: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            idle = self._answer is None or self._answer.done()
            try:
                event = await asyncio.wait_for(read_event(self.reader), IDLE_TIMEOUT if idle else None)
            except TimeoutError:
                return
            except ConnectionError:  # a reset (a client closing with replies unread sends one): gone, not finished
                log.info("Wyoming: a client reset its connection")
                return
            except WireProblem as exc:
                log.info("Wyoming: closing a connection that sent garbage: %s", exc)
                await self.send(Error(text=str(exc), code="bad_request").event())
                return
            if event is None:
                if self._answer is not None:  # the peer finished sending; let the answer go out
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._answer
                return
            if Describe.is_type(event.type):
                await self.send(self.server.info().event())
            elif Ping.is_type(event.type):
                await self.send(Pong(text=event.data.get("text")).event())
            elif Transcript.is_type(event.type):
                if self._answer is not None and not self._answer.done():
                    await self.send(NotHandled(text=refusal("busy", guess_language(str(event.data.get("text")))))
                                    .event())
                else:
                    self._answer = asyncio.create_task(self.guarded_answer(event))
            else:
                log.debug("Wyoming: ignoring a %r event", event.type)

    async def send(self, event: Event) -> bool:
        async with self._write_lock:
            try:
                await async_write_event(event, self.writer)
                return True
            except (ConnectionError, RuntimeError):
                return False  # Home Assistant closes as soon as it has `handled`

    async def close(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._answer
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def guarded_answer(self, event: Event) -> None:
        try:
            await self.answer(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Wyoming handler failed")
            await self.send(NotHandled(text=refusal("internal", "en")).event())

    async def answer(self, event: Event) -> None:
        server, config = self.server, self.server.config
        text, context = event.data.get("text"), event.data.get("context")
        context = context if isinstance(context, dict) else {}
        conversation_id = context.get("conversation_id")
        conversation_id = conversation_id if isinstance(conversation_id, str) and conversation_id else None
        language = event.data.get("language")
        language = language if isinstance(language, str) and language else guess_language(str(text or ""))
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            error = BadRequest(f"a transcript needs 'text' of 1-{MAX_TEXT} characters", param="text")
            server.scheduler.record_error("wyoming", error)
            await self.send(NotHandled(text=refusal(error.code, language), context=context).event())
            return
        w = config.wyoming
        messages = [{"role": "system", "content": w.system_prompt or DEFAULT_SYSTEM_PROMPT}]
        for question, reply in server.conversations.history(conversation_id):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": text})
        body = {"id": f"wyoming-{uuid.uuid4().hex[:12]}", "messages": messages, "max_tokens": w.max_tokens,
                "temperature": w.temperature, "stream": True}
        if w.model:
            body["model"] = w.model
        sink = AsyncSink(asyncio.get_running_loop())
        try:
            job = server.scheduler.submit(parse_generate(body), sink, "wyoming")
        except ApplianceError as exc:
            server.scheduler.record_error("wyoming", exc)
            log.info("Wyoming: transcript refused: %s", exc.code)
            await self.send(NotHandled(text=refusal(exc.code, language), context=context).event())
            return
        if config.logging.log_prompts:
            log.debug("Wyoming: request %r transcript=%r", body["id"], text)
        reply_context = {**context, "conversation_id": conversation_id} if conversation_id else context
        try:
            await self._stream(job, sink, text, conversation_id, language, reply_context)
        finally:
            if not job.finished:  # the client went away or the server is stopping: free the worker
                server.scheduler.cancel_job(job, Cancelled("the Wyoming client disconnected"))

    async def _stream(self, job: Job, sink: AsyncSink, question: str, conversation_id: str | None, language: str,
                      context: dict[str, Any]) -> None:
        if not await self.send(HandledStart(context=context).event()):
            return  # the client is gone: the caller frees the worker
        while True:
            match await sink.items.get():
                case Chunk(text=text):
                    if text and not await self.send(HandledChunk(text=text).event()):
                        return
                case Done(completion=completion):
                    answer = completion.text.strip()
                    self.server.conversations.add(conversation_id, question, answer)
                    await self.send(Handled(text=answer, context=context).event())
                    await self.send(HandledStop().event())
                    return
                case Failed(error=error):
                    await self.send(NotHandled(text=refusal(error.code, language), context=context).event())
                    return
