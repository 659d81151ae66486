"""The HTTP API (OpenAI-compatible), health, readiness and metrics, against the real appliance process."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlparse

import pytest

from tests.support.harness import http_get, http_post
from tests.support.lan import lan_address


def test_completion(appliance):
    status, body = http_post(appliance.http_url + "/v1/completions",
                             {"model": "tiny", "prompt": "the cat", "max_tokens": 7, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


def test_chat_completion(appliance):
    status, body = http_post(appliance.http_url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)


def _sse_events(url: str, path: str, body: dict):
    """Yield (arrival time, event) for each SSE event, as the bytes arrive."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    while True:
        line = resp.fp.readline()
        if not line:
            break
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            yield time.monotonic(), (data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    conn.close()


def test_sse_first_chunk_arrives_before_generation_ends(appliance_factory):
    app = appliance_factory("slow", {"worker": {"context_size": 4096}})
    events, running_at_first_text = [], None
    for arrival, event in _sse_events(app.http_url, "/v1/completions",
                                      {"prompt": "a", "max_tokens": 600, "stream": True, "temperature": 0,
                                       "stream_options": {"include_usage": True}}):
        events.append((arrival, event))
        if running_at_first_text is None and event != "[DONE]" and event["choices"] and event["choices"][0]["text"]:
            # asked of the device, not of a clock: a stream buffered to the end would arrive after the generation
            # has finished (a timing bound failed on a fast quiet CI machine: 600 tokens in 0.44 s)
            running_at_first_text = app.metric("appliance_requests_running")
    assert events[-1][1] == "[DONE]"
    assert running_at_first_text == 1.0, "chunks must be sent as generated, not buffered to the end"
    text = "".join(e["choices"][0]["text"] for _, e in events if e != "[DONE]" and e["choices"])
    usage = [e["usage"] for _, e in events if e != "[DONE]" and e.get("usage")]
    assert usage and usage[0]["completion_tokens"] == 600
    # the same request without streaming gives the same text (temperature 0); 600 tokens of the slow model take
    # 1.5 s on a quiet 2-core machine and minutes when it is shared
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 600, "temperature": 0},
                             timeout=280)
    assert body["choices"][0]["text"] == text


def test_chat_stream_shape(appliance):
    events = [e for _, e in _sse_events(appliance.http_url, "/v1/chat/completions",
                                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                         "stream": True})]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_client_disconnect_cancels_the_generation(appliance_factory):
    app = appliance_factory("slow", {"worker": {"context_size": 4096}})
    parsed = urlparse(app.http_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 4000, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.fp.readline()
    resp.close()
    conn.close()
    started = time.monotonic()
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 200
    assert time.monotonic() - started < 5, "the abandoned stream must not keep the worker for 4000 tokens"
    metrics = http_get(app.http_url + "/metrics")[1].decode()
    assert 'appliance_errors_total{code="cancelled"} 1.0' in metrics


@pytest.mark.parametrize("path, body, status, code, param", [
    ("/v1/completions", b"{", 400, "bad_request", None),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "bad_request", "prompt"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "bad_request", "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": 3}, 400, "bad_request", "logprobs"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "unknown_model", "model"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "bad_request", "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 600}, 400, "too_long", "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "bad_request", "messages"),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "bad_request", "prompt"),
    ("/v1/nothing", {}, 404, "bad_request", None),
])
def test_http_errors_are_openai_shaped(appliance, path, body, status, code, param):
    got_status, got = http_post(appliance.http_url + path, body)
    assert got_status == status
    assert got["error"]["code"] == code and got["error"]["param"] == param and got["error"]["message"]
    assert got["error"]["type"] == "invalid_request_error"
    assert http_post(appliance.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def test_models_health_and_metrics(appliance):
    status, body = http_get(appliance.http_url + "/v1/models")
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert status == 200 and "tiny" in ids and "slow" in ids
    assert http_get(appliance.http_url + "/healthz")[0] == 200
    status, body = http_get(appliance.http_url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert appliance.metric("appliance_tokens_per_second") == 0.0  # nothing generated yet
    status, done = http_post(appliance.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 3})
    assert status == 200, done
    http_post(appliance.http_url + "/v1/completions", {"prompt": 1})
    speed = appliance.metric("appliance_tokens_per_second")
    assert speed > 0 and abs(speed - done["timings"]["tokens_per_s"]) <= 0.005  # the reply rounds to 0.01
    metrics = http_get(appliance.http_url + "/metrics")[1].decode()
    for line in ('appliance_requests_total{outcome="ok",transport="http"} 1.0',
                 'appliance_errors_total{code="bad_request"} 1.0',
                 'appliance_model_loaded{model="tiny"} 1.0',
                 'appliance_state{state="ready"} 1.0',
                 "appliance_completion_tokens_total 3.0",
                 "appliance_queue_depth 0.0",
                 "appliance_time_to_first_token_seconds_count 1.0"):
        assert line in metrics, line


def test_readyz_is_503_with_the_reason_when_the_model_cannot_load(appliance_factory):
    app = appliance_factory("corrupt", start=False).start(wait=False)
    status, body = app.readyz_until("degraded")[-1]
    assert status == 503
    reason = body["reason"]
    assert "sha256 mismatch" in reason and "0" * 64 in reason and "tiny-q4_0.gguf" in reason
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 500 and body["error"]["code"] == "model_error" and "sha256" in body["error"]["message"]
    status, body = http_post(app.http_url + "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert status == 200, "other catalog models still work"


API_KEY = "an-api-key-for-tests-0123"


def test_api_key(appliance_factory, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    app = appliance_factory(overrides={"http": {"api_key_file": str(key_file)}}, start=False)
    app.start(wait=False)
    app.readyz_until("ready", headers={"Authorization": f"Bearer {API_KEY}"})
    assert http_get(app.http_url + "/healthz")[0] == 200
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert http_get(app.http_url + "/metrics")[0] == 401
    status, _ = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2},
                          headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2},
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200


def test_the_api_is_not_served_to_the_network_without_a_key(appliance_factory, tmp_path):
    """`serve` refuses a non-loopback bind without a key (exit 2, the keys named, nothing listening); with a key
    the network gets only /healthz without it; `allow_anonymous` opens it and says so in the log."""
    lan = lan_address()
    app = appliance_factory(overrides={"http": {"bind": "0.0.0.0"}}, start=False)
    app.start(wait=False)
    assert app.proc.wait(60) == 2, app.log_text()
    for key in ("http.bind = '0.0.0.0'", "http.api_key_file", "http.allow_anonymous"):
        assert key in app.log_text()
    with pytest.raises(OSError):
        http_get(f"http://{lan}:{app.config['http']['port']}/healthz", timeout=2)

    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    app = appliance_factory(overrides={"http": {"bind": "0.0.0.0", "api_key_file": str(key_file)}}, start=False)
    app.start(wait=False)
    base, auth = f"http://{lan}:{app.config['http']['port']}", {"Authorization": f"Bearer {API_KEY}"}
    app.readyz_until("ready", headers=auth)
    assert http_get(base + "/healthz")[0] == 200
    for route in ("/v1/models", "/status", "/metrics", "/readyz"):
        assert http_get(base + route)[0] == 401, route
        assert http_get(base + route, headers=auth)[0] == 200, route

    app = appliance_factory(overrides={"http": {"bind": "0.0.0.0", "allow_anonymous": True}})
    assert http_get(f"http://{lan}:{app.config['http']['port']}/v1/models")[0] == 200
    assert "without an API key (http.allow_anonymous = true)" in app.log_text()


def test_openai_python_client(appliance):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=appliance.http_url + "/v1", api_key="unused")
    assert "tiny" in [m.id for m in client.models.list()]
    completion = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True)
        if c.choices]
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    assert "".join(pieces) == again.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.code == "unknown_model"


def test_concurrent_requests_are_all_answered(appliance):
    results: list[int] = []

    def one(i: int) -> None:
        status, _ = http_post(appliance.http_url + "/v1/completions", {"prompt": f"n{i}", "max_tokens": 5})
        results.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 5  # max_queue 4 + 1 running


def test_client_disconnect_cancels_a_non_streamed_request_too(appliance_factory):
    app = appliance_factory("slow", {"worker": {"context_size": 4096}})
    parsed = urlparse(app.http_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 4000}),
                 {"Content-Type": "application/json"})
    time.sleep(0.5)
    conn.close()  # gone before the answer
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if 'appliance_errors_total{code="cancelled"} 1.0' in http_get(app.http_url + "/metrics")[1].decode():
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the generation of a vanished client was not cancelled")
    status, _ = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 200


def test_readyz_is_503_while_the_model_loads(appliance_factory, tmp_path):
    """A 1 GiB model file takes a while to digest-check: the status is `loading` and /readyz says 503 until then."""
    from tests.support import tiny_models
    big = tiny_models.write_llama(tmp_path / "big.gguf")
    with big.open("r+b") as fh:
        fh.truncate(1 << 30)  # a real GGUF header, then sparse zeros: no disk space used
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[models]]\nid = "big"\nfile = "{big}"\nsha256 = "{"1" * 64}"\n')
    app = appliance_factory("big", {"models": {"catalog": str(catalog)}}, start=False).start(wait=False)
    seen = app.readyz_until("degraded")
    assert all(status == 503 for status, _ in seen), "never ready: the file is not a model"
    assert "loading" in [body["status"] for _, body in seen], seen
