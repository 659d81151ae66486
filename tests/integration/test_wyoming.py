"""The Wyoming conversation agent, driven by the `wyoming` package's own client as Home Assistant drives it: describe
-> info (fast, even while generating), transcript -> handled with the model's reply (the same text the HTTP API gives
for the same conversation), refusals spoken as not-handled, garbage answered with an error, loopback by default."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, HandledChunk, HandledStop, NotHandled
from wyoming.info import Describe, Info

from appliance.config import ConfigError, load_config
from appliance.transports.broker import free_port
from appliance.transports.wyoming_talk import DEFAULT_SYSTEM_PROMPT
from tests.support.harness import http_post, run_cli, toml_text

SETTINGS = {"enabled": True, "temperature": 0, "max_tokens": 12}


def wyoming_app(factory, default: str = "tiny", worker: dict | None = None, **extra):
    port = free_port()
    app = factory(default, {"wyoming": {**SETTINGS, "port": port, **extra}, "worker": worker or {}}, mqtt=False)
    # no wait for the port: the service listens for Wyoming before /readyz can answer (a CI run's garbage test was
    # refused its connection when it started Wyoming after HTTP)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return app, port


async def describe(port: int) -> tuple[Info, float]:
    """Home Assistant's probe: a new connection, describe, wait for info (HA gives up after 1 s)."""
    start = time.monotonic()
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=5) as client:
        await client.write_event(Describe().event())
        while True:
            event = await client.read_event()
            if Info.is_type(event.type):
                return Info.from_event(event), time.monotonic() - start


async def converse(port: int, text: str, context: dict | None = None, language: str | None = None) -> list:
    """One Assist turn: a new connection, a transcript, every event up to handled-stop or not-handled."""
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=300) as client:
        await client.write_event(Transcript(text=text, context=context, language=language).event())
        events = []
        while True:
            event = await client.read_event()
            assert event is not None, f"connection closed after {[e.type for e in events]}"
            events.append(event)
            if HandledStop.is_type(event.type) or NotHandled.is_type(event.type):
                return events


def test_describe_advertises_a_handle_program_with_its_languages(appliance_factory):
    app, port = wyoming_app(appliance_factory)
    info, elapsed = asyncio.run(describe(port))
    assert elapsed < 1.0
    assert not info.asr and not info.tts and not info.intent
    [program] = info.handle
    assert program.installed and program.name == "appliance" and program.supports_handled_streaming
    [model] = program.models
    assert model.name == "tiny" and model.installed
    assert {"en", "es", "zh"} <= set(model.languages)


def test_transcript_is_answered_with_the_models_reply(appliance_factory):
    app, port = wyoming_app(appliance_factory, "tiny-chat")
    events = asyncio.run(converse(port, "What is the weather like?", context={"conversation_id": "c1"}))
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"], types
    handled = Handled.from_event(events[-2])
    chunks = "".join(HandledChunk.from_event(e).text for e in events if HandledChunk.is_type(e.type))
    assert handled.text and handled.text == chunks.strip()
    assert handled.context == {"conversation_id": "c1"}
    # the same conversation over the OpenAI API gives the same reply: it is the model's, not a canned one
    status, body = http_post(app.http_url + "/v1/chat/completions", {
        "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                     {"role": "user", "content": "What is the weather like?"}],
        "max_tokens": SETTINGS["max_tokens"], "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"].strip() == handled.text

    # the next turn of the conversation carries the first one; another conversation does not
    follow_up = Handled.from_event(asyncio.run(converse(port, "And tomorrow?", {"conversation_id": "c1"}))[-2])
    status, body = http_post(app.http_url + "/v1/chat/completions", {
        "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                     {"role": "user", "content": "What is the weather like?"},
                     {"role": "assistant", "content": handled.text},
                     {"role": "user", "content": "And tomorrow?"}],
        "max_tokens": SETTINGS["max_tokens"], "temperature": 0})
    assert body["choices"][0]["message"]["content"].strip() == follow_up.text
    assert app.metric('appliance_requests_total{outcome="ok",transport="wyoming"}') == 2.0


async def generating(port: int, text: str) -> tuple[AsyncTcpClient, list]:
    """A turn whose model is generating now: its first chunk has arrived. Returns the client and the events so far."""
    client = AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=300)
    await client.connect()
    await client.write_event(Transcript(text=text).event())
    events = []
    while not events or not HandledChunk.is_type(events[-1].type):
        events.append(await client.read_event())
        assert not NotHandled.is_type(events[-1].type), events
    return client, events


async def rest_of_turn(client: AsyncTcpClient, events: list) -> list:
    while not HandledStop.is_type(events[-1].type):
        events.append(await client.read_event())
    await client.disconnect()
    return events


def test_describe_is_answered_at_once_while_the_model_generates(appliance_factory):
    app, port = wyoming_app(appliance_factory, "slow", {"context_size": 4096, "request_timeout": 300},
                            max_tokens=800)

    async def scenario():
        client, events = await generating(port, "Tell me a long story.")
        probes = [(await describe(port))[1] for _ in range(3)]
        still_generating = app.metric("appliance_requests_running") == 1.0
        return probes, still_generating, await rest_of_turn(client, events)

    probes, still_generating, events = asyncio.run(scenario())
    assert still_generating, "the probes ran while the model was generating"
    assert max(probes) < 1.0, probes
    assert Handled.is_type(events[-2].type) and len(Handled.from_event(events[-2]).text) > 50


def test_refusals_are_spoken_in_the_question_language(appliance_factory):
    app, port = wyoming_app(appliance_factory, "slow", {"max_queue": 0, "context_size": 4096, "request_timeout": 300},
                            max_tokens=800)

    async def scenario():
        client, events = await generating(port, "Tell me a long story.")
        busy = await asyncio.gather(converse(port, "¿Qué hora es?"), converse(port, "现在几点？"),
                                    converse(port, "What time is it?"))
        await rest_of_turn(client, events)
        return busy

    spanish, chinese, english = asyncio.run(scenario())
    for events, needle in ((spanish, "ocupado"), (chinese, "稍后"), (english, "busy")):
        [event] = events
        assert NotHandled.is_type(event.type) and needle in NotHandled.from_event(event).text
    assert app.metric('appliance_errors_total{code="busy"}') == 3.0


@pytest.mark.parametrize("ending", ["closes", "resets"])
def test_a_client_that_goes_away_frees_the_worker(appliance_factory, ending):
    """A client that closes mid-answer, or whose connection ends in a reset (one that closes with replies unread
    sends one; SO_LINGER 0 makes it every time): its generation is cancelled, and nothing is logged as an error (a
    reset used to escape the connection's task: asyncio's "Unhandled exception in client_connected_cb" and a
    traceback, which the teardown also looks for)."""
    app, port = wyoming_app(appliance_factory, "slow", {"context_size": 4096, "request_timeout": 300},
                            max_tokens=3000)

    async def scenario():
        client, _ = await generating(port, "Tell me a long story.")
        if ending == "resets":
            sock = client._writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.disconnect()

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while app.metric('appliance_requests_total{outcome="cancelled",transport="wyoming"}') != 1.0:
        assert time.monotonic() < deadline, "the generation went on for nobody"
        time.sleep(0.1)
    assert app.metric("appliance_requests_running") == 0.0
    assert "Unhandled exception" not in app.log_text()
    if ending == "resets":
        assert "a client reset its connection" in app.log_text()


def _raw(port: int, data: bytes) -> list[dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    lines, out = received.split(b"\n"), []
    i = 0
    while i < len(lines) and lines[i]:
        header = json.loads(lines[i])
        if header.get("data_length"):
            rest = b"\n".join(lines[i + 1:])
            header["data"] = json.loads(rest[:header["data_length"]])
            lines = [b""] * (i + 1) + rest[header["data_length"]:].split(b"\n")
        out.append(header)
        i += 1
    return out


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1, 2]\n", b'{"data": {}}\n', b'{"type": "x", "data": 5}\n',
                                     b'{"type": "transcript", "data_length": 999999999}\n',
                                     b'{"type": "transcript", "data_length": "ten"}\n', b"x" * 70000 + b"\n"])
def test_garbage_gets_an_error_and_the_server_stays_up(appliance_factory, garbage):
    app, port = wyoming_app(appliance_factory)
    [event] = _raw(port, garbage)
    assert event["type"] == "error" and event["data"]["code"] == "bad_request"
    info, _ = asyncio.run(describe(port))
    assert info.handle
    events = asyncio.run(converse(port, ""))
    assert NotHandled.is_type(events[-1].type)


def test_loopback_unless_the_operator_opts_in(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"wyoming": {"enabled": True, "bind": "0.0.0.0"}}))
    with pytest.raises(ConfigError, match=r"wyoming\.bind = '0\.0\.0\.0'.*wyoming\.allow_anonymous"):
        load_config(path, env={})
    path.write_text(toml_text({"wyoming": {"enabled": True, "bind": "0.0.0.0", "allow_anonymous": True,
                                           "allowed_clients": "192.168.1.10, 10.0.0.0/24"}}))
    assert load_config(path, env={}).wyoming.allow_anonymous
    path.write_text(toml_text({"wyoming": {"allowed_clients": "192.168.1.300"}}))
    with pytest.raises(ConfigError, match="wyoming.allowed_clients"):
        load_config(path, env={})
    assert load_config(None, env={}).wyoming.enabled is False, "off by default"


def test_clients_outside_allowed_clients_are_turned_away(appliance_factory):
    app, port = wyoming_app(appliance_factory, allowed_clients="192.0.2.0/24")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", "closed without an answer"
    assert "refused a connection from 127.0.0.1" in app.log_text()


def test_transcript_text_stays_out_of_the_log(appliance_factory):
    app, port = wyoming_app(appliance_factory)
    asyncio.run(converse(port, "my secret question about zebras"))
    assert "zebras" not in app.log_text()


def test_appliance_ask_over_wyoming(appliance_factory):
    app, port = wyoming_app(appliance_factory, "tiny-chat")
    result = run_cli("ask", "What is the weather like?", "--wyoming", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    direct = Handled.from_event(asyncio.run(converse(port, "What is the weather like?"))[-2])
    assert result.stdout.strip() == direct.text
    refused = run_cli("ask", "hi", "--wyoming", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "error:" in refused.stderr
