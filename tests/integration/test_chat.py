"""`appliance chat` in a real terminal (tmux), against an appliance serving the real default model, over HTTP and
over MQTT: streamed answers, the conversation kept and /reset, /model, Ctrl-C cancelling on the device (seen in its
log and /metrics), Ctrl-D quitting."""

from __future__ import annotations

import re
import sys
import time

import pytest

from appliance.catalog import default_model
from tests.support.harness import http_get
from tests.support.terminal import Terminal

pytestmark = pytest.mark.default_model

COLOURS = re.compile(r"\b(red|blue|green|yellow|orange|purple|black|white|pink|brown)\b", re.I)
LONG = "Write a long story about a dragon who learns to fly."  # 400 tokens and more at temperature 0


def chat(*where: str) -> Terminal:
    return Terminal([sys.executable, "-m", "appliance", "chat", *where, "--temperature", "0", "--max-tokens", "1000"])


def prompt_tokens(app) -> list[int]:
    """Prompt tokens of each request the device finished, from its log, in order."""
    return [int(n) for n in re.findall(r"done in [\d.]+ s: (\d+) prompt", app.log_text())]


def cancelled(app, transport: str) -> float:
    text = http_get(app.http_url + "/metrics")[1].decode()
    found = re.search(rf'^appliance_requests_total\{{outcome="cancelled",transport="{transport}"\}} (\S+)$', text,
                      re.M)
    return float(found.group(1)) if found else 0.0


def converse(term: Terminal, app, transport: str, shown: int = 1) -> None:
    """The same conversation over either transport; ``shown``: prompts already on the screen."""
    banner = term.wait_prompts(shown, timeout=60)
    assert "Ctrl-C stops an answer, Ctrl-D quits" in banner, banner

    term.type("Name three colours.")
    screen = term.wait_prompts(shown + 1)
    answer = screen.split("Name three colours.")[1].split(">>> ")[0]
    assert len({c.lower() for c in COLOURS.findall(answer)}) >= 3, screen

    term.type("And two more?")  # the first exchange travels with the second question
    term.wait_prompts(shown + 2)
    first, second = prompt_tokens(app)[-2:]
    assert second > first + 10, (first, second)

    term.type("/reset")
    term.wait_for(lambda s: "(conversation cleared)" in s, 30, "the reset")
    term.type("And two more?")
    term.wait_prompts(shown + 4)
    assert prompt_tokens(app)[-1] < second, prompt_tokens(app)

    before, log_before = cancelled(app, transport), len(app.log_text())
    term.type(LONG)
    term.wait_for(lambda s: "Once upon a time" in s.split(LONG)[-1], 120, "the story starting")
    term.send("C-c")
    screen = term.wait_for(lambda s: "(cancelled)" in s.split(LONG)[-1], 60, "the cancel")
    # over HTTP the device sees the closed connection at its next write or poll: wait for it, then it is counted once
    deadline = time.monotonic() + 60
    while cancelled(app, transport) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled(app, transport) == before + 1, "the device did not count one cancelled request"
    assert len(re.findall(r"request '[^']+' failed after [\d.]+ s: cancelled", app.log_text()[log_before:])) == 1
    assert ">>> " in screen.split("(cancelled)")[-1], "the chat should be ready for the next question"

    term.send("C-d")
    screen = term.wait_for(lambda s: "EXIT=" in s, 30, "the exit")
    assert "EXIT=0" in screen, screen


def test_chat_over_http(default_app):
    term = chat("--http", default_app.http_url)
    try:
        term.wait_prompts(1, timeout=60)
        assert f"model {default_model.MODEL_ID}" in term.screen()
        term.type("/model nope")
        term.wait_for(lambda s: "no model 'nope' on the device" in s, 30, "the refusal")
        assert f"(available: {default_model.MODEL_ID})" in term.screen()
        term.type(f"/model {default_model.MODEL_ID}")
        term.wait_for(lambda s: f"(model: {default_model.MODEL_ID})" in s, 30, "the switch")
        converse(term, default_app, "http", shown=3)
    finally:
        term.close()


def test_chat_over_mqtt(default_app, broker):
    term = chat("--mqtt", f"127.0.0.1:{broker.port}", "--device", default_app.device)
    try:
        converse(term, default_app, "mqtt")
    finally:
        term.close()

