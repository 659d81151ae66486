"""Prompt and completion text never reach the logs unless the operator turns ``logging.log_prompts`` on."""

from __future__ import annotations

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


def test_default_logs_hold_no_request_text(appliance_factory, mqtt_client):
    app = appliance_factory(overrides={"logging": {"level": "debug"}})
    secret, completion, lines = _exercise(app, mqtt_client)
    assert len(completion) >= 16
    assert any("done in" in line for line in lines), "the test must see the request log lines"
    assert not [line for line in lines if secret in line]
    assert not [line for line in lines if completion in line]


def test_log_prompts_puts_them_in_the_log(appliance_factory, mqtt_client):
    """The same check fails when the operator opts in: proof the test above can fail."""
    app = appliance_factory(overrides={"logging": {"level": "debug", "log_prompts": True}})
    secret, completion, lines = _exercise(app, mqtt_client)
    assert [line for line in lines if secret in line]
    assert [line for line in lines if completion in line]
