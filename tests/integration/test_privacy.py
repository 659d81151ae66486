"""Prompt and completion text never reach the logs unless the operator turns ``logging.log_prompts`` on."""

from __future__ import annotations

import json
import uuid

from tests.support.harness import http_post


def _exercise(app, mqtt_client) -> tuple[str, str, list[str]]:
    secret = f"SECRET-{uuid.uuid4().hex}"
    client = mqtt_client()
    final = client.request(app.topic("generate"), {"prompt": f"my pin is {secret}", "max_tokens": 24,
                                                   "temperature": 0, "stream": True})[-1]
    completion = final["text"]
    client.request(app.topic("generate"), {"messages": [{"role": "user", "content": f"chat {secret}"}],
                                           "max_tokens": 4})
    client.request(app.topic("generate"), {"prompt": f"bad {secret}", "max_tokens": "x"})  # refused
    http_post(app.http_url + "/v1/completions", {"prompt": f"http {secret}", "max_tokens": 4})
    http_post(app.http_url + "/v1/completions", {"prompt": f"too long {secret} " + "word " * 600})
    app.stop()
    return secret, completion, app.log_text().splitlines()


def _leaks(lines: list[str], text: str) -> list[str]:
    """Lines holding ``text`` as is or escaped the way repr() or JSON would write it."""
    forms = {text, repr(text)[1:-1], json.dumps(text)[1:-1]}
    return [line for line in lines if any(form in line for form in forms)]


def test_default_logs_hold_no_request_text(appliance_factory, mqtt_client):
    app = appliance_factory(overrides={"logging": {"level": "debug"}})
    secret, completion, lines = _exercise(app, mqtt_client)
    assert len(completion) >= 16
    assert any("done in" in line for line in lines), "the test must see the request log lines"
    assert not _leaks(lines, secret)
    assert not _leaks(lines, completion)


def test_log_prompts_puts_them_in_the_log(appliance_factory, mqtt_client):
    """The same check fails when the operator opts in: proof the test above can fail."""
    app = appliance_factory(overrides={"logging": {"level": "debug", "log_prompts": True}})
    secret, completion, lines = _exercise(app, mqtt_client)
    assert _leaks(lines, secret)
    assert _leaks(lines, completion)
