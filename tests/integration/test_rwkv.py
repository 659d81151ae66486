"""RWKV .pth checkpoints (Raven v4, World v5/v6/v7) through the rwkv package, served over MQTT and HTTP like any
GGUF: the text equals what the package generates on its own, and streaming, stops, cancel and errors keep the same
contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from appliance.catalog import Catalog, sha256_file
from tests.support import tiny_rwkv
from tests.support.harness import REPO, http_post, run_cli

pytest.importorskip("rwkv")
pytest.importorskip("torch")

# id: (version, strategy in the catalog entry: None takes worker.rwkv_strategy, the default "cpu fp32i8")
MODELS = {"raven-v4": (4, "cpu fp32i8"), "world-v5": (5, "cpu fp32"), "world-v6": (6, None),
          "world-v7": (7, "cpu fp32i8")}
# more tokens than worker.batch_size (8): the state is carried from one prompt chunk to the next
PROMPT = "The weather station on the hill reports that the river is rising and the wind is strong tonight,"
CASES = [{"temperature": 0, "top_p": 1.0, "top_k": 0, "seed": 0},
         {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 7},
         {"temperature": 0.7, "top_p": 0.6, "top_k": 20, "seed": 11}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def rwkv_catalog(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("rwkv")
    tokenizer = tiny_rwkv.write_pile_tokenizer(d / "20B_tokenizer.json")
    files = {model_id: tiny_rwkv.write(version, d / f"{model_id}.pth", seed=version,
                                       tokenizer_json=tokenizer if version == 4 else None)
             for model_id, (version, _) in MODELS.items()}
    entries = []
    for model_id, (version, strategy) in MODELS.items():
        family = "raven" if version == 4 else "rwkv-world"
        lines = [f'id = "{model_id}"', f'file = "{files[model_id].name}"', f'sha256 = "{sha256_file(files[model_id])}"',
                 f'family = "{family}"', f'template = "{family}"']
        lines += [f'strategy = "{strategy}"'] if strategy else []
        lines += ['tokenizer = "20B_tokenizer.json"'] if version == 4 else []
        entries.append("\n".join(lines))
    # a Raven-sized model whose entry forgets its tokenizer
    untokenized = tiny_rwkv.write(4, d / "raven-untokenized.pth", n_layer=1, vocab_size=50277)
    entries.append(f'id = "raven-untokenized"\nfile = "{untokenized.name}"\nsha256 = "{sha256_file(untokenized)}"')
    tiny = models_dir / "tiny-q4_0.gguf"
    entries.append(f'id = "tiny"\nfile = "{tiny}"\nsha256 = "{sha256_file(tiny)}"\ntemplate = "chatml"')
    catalog = d / "catalog.toml"
    catalog.write_text("".join(f"[[models]]\n{e}\n\n" for e in entries))
    return files, tokenizer, catalog


@pytest.fixture(scope="module")
def reference(rwkv_catalog):
    """The rwkv package generating by itself, one process per model (RWKV-7 is chosen at import)."""
    files, tokenizer, _ = rwkv_catalog
    texts = {}
    for model_id, (version, strategy) in MODELS.items():
        spec = {"stem": str(files[model_id].with_suffix("")), "prompt": PROMPT,
                "strategy": "cpu fp32" if version == 7 else (strategy or "cpu fp32i8"),
                "tokenizer": str(tokenizer) if version == 4 else "world",
                "cases": [{**c, "max_tokens": MAX_TOKENS} for c in CASES]}
        env = {**os.environ, "PYTHONPATH": str(REPO), **({"RWKV_V7_ON": "1"} if version == 7 else {})}
        result = subprocess.run([sys.executable, "-m", "tests.support.rwkv_reference", json.dumps(spec)],
                                capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert result.returncode == 0, (model_id, result.stderr[-2000:])
        texts[model_id] = json.loads(result.stdout.strip().splitlines()[-1])
    return texts


@pytest.fixture(scope="module")
def app(rwkv_catalog, broker, tmp_path_factory):
    from tests.support.harness import new_appliance
    _, _, catalog = rwkv_catalog
    instance = new_appliance(tmp_path_factory.mktemp("rwkv-app"), broker.port, catalog, "world-v6",
                             {"worker": {"threads": 1, "batch_size": 8, "context_size": 1024, "max_queue": 8}})
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("model_id", list(MODELS))
def test_text_is_what_the_rwkv_package_generates(app, mqtt_client, reference, model_id):
    client = mqtt_client()
    for case, expected in zip(CASES, reference[model_id], strict=True):
        final = client.request(app.topic("generate"), {"model": model_id, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                       **case})[-1]
        assert final["type"] == "result", final
        assert final["text"] == expected["text"], (model_id, case)
        assert final["usage"]["completion_tokens"] == expected["tokens"] == MAX_TOKENS
        assert final["finish_reason"] == "length" and final["usage"]["prompt_tokens"] > 2 * 8
    assert len({r["text"] for r in reference[model_id]}) == len(CASES), "seeds and settings change the text"
    assert app.status()["model"] == model_id


def test_chat_streams_with_the_family_template_and_stop_sequences(app, mqtt_client):
    client = mqtt_client()
    request = {"model": "raven-v4", "messages": [{"role": "user", "content": "What is the weather like?"}],
               "max_tokens": 24, "temperature": 0, "stream": True}
    replies = client.request(app.topic("generate"), request)
    final = replies[-1]
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 24
    assert "".join(r["delta"] for r in replies[:-1]) == final["text"] and len(replies) > 2
    # Raven's prompt is "Bob: ...\n\nAlice:": 5 tokens of the tiny BPE at least
    assert final["usage"]["prompt_tokens"] >= 5
    stop = final["text"][len(final["text"]) // 2:][:3]
    cut = client.request(app.topic("generate"), {**request, "stop": [stop]})
    assert cut[-1]["text"] == final["text"][:final["text"].index(stop)]
    assert cut[-1]["finish_reason"] == "stop"
    assert "".join(r["delta"] for r in cut[:-1]) == cut[-1]["text"], "no part of the stop sequence was streamed"


def test_openai_chat_over_http(app):
    status, body = http_post(app.http_url + "/v1/chat/completions", {
        "model": "world-v5", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hello"}],
        "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    assert body["model"] == "world-v5" and body["usage"]["completion_tokens"] == 10
    assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "length"


def test_cancel_stops_a_long_generation(app, mqtt_client):
    client = mqtt_client()
    client.subscribe("test/rwkv/#")
    client.publish(app.topic("generate"), {"id": "long", "model": "world-v6", "prompt": "a", "max_tokens": 900,
                                           "stream": True}, response_topic="test/rwkv/long", correlation=b"l")
    client.wait_for(lambda m: m.topic == "test/rwkv/long")
    client.cancel(app.topic("cancel"), "long", "test/rwkv/long")
    final = [r for r in client.replies("test/rwkv/long", timeout=30) if r.get("type") != "chunk"][-1]
    assert final["error"]["code"] == "cancelled"
    again = client.request(app.topic("generate"), {"model": "world-v6", "prompt": "a", "max_tokens": 3})[-1]
    assert again["type"] == "result" and again["usage"]["completion_tokens"] == 3


def test_switching_between_rwkv_and_llama_cpp_models(app, mqtt_client):
    client = mqtt_client()
    for model_id in ("tiny", "world-v7", "tiny", "raven-v4"):
        final = client.request(app.topic("generate"), {"model": model_id, "prompt": "hello", "max_tokens": 4,
                                                       "temperature": 0})[-1]
        assert final["type"] == "result" and final["model"] == model_id, final


def test_a_raven_model_without_its_tokenizer_is_refused_clearly(app, mqtt_client):
    client = mqtt_client()
    final = client.request(app.topic("generate"), {"model": "raven-untokenized", "prompt": "hi",
                                                   "max_tokens": 2})[-1]
    assert final["error"]["code"] == "model_error"
    assert "20B_tokenizer.json" in final["error"]["message"]
    assert app.status()["state"] == "ready", app.log_text()[-3000:]


def test_models_add_reads_the_checkpoint_and_needs_a_ravens_tokenizer(rwkv_catalog, tmp_path):
    files, tokenizer, _ = rwkv_catalog
    catalog = tmp_path / "catalog.toml"
    refused = run_cli("models", "add", str(files["raven-v4"]), "--family", "raven", "--catalog", str(catalog))
    assert refused.returncode != 0 and "tokenizer" in refused.stderr and not catalog.exists()
    added = run_cli("models", "add", str(files["raven-v4"]), "--family", "raven", "--tokenizer", str(tokenizer),
                    "--strategy", "cpu fp32", "--catalog", str(catalog))
    assert added.returncode == 0, added.stderr
    assert "rwkv_version 4" in added.stdout and "layers 2" in added.stdout
    world = run_cli("models", "add", str(files["world-v7"]), "--family", "rwkv-world", "--catalog", str(catalog))
    assert world.returncode == 0 and "vocabulary world" in world.stdout, world.stderr
    entries = {e.id: e for e in Catalog.load(catalog)}
    raven = entries["raven-v4"]
    assert raven.backend == "rwkv" and raven.template == "raven" and raven.strategy == "cpu fp32"
    assert raven.tokenizer == str(tokenizer) and raven.licence.startswith("Apache-2.0")
    assert entries["world-v7"].template == "rwkv-world" and entries["world-v7"].tokenizer is None
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\ncatalog = "{catalog}"\ndefault = "world-v7"\n[memory]\nbudget_mib = 100000\n')
    fit = run_cli("models", "fit", "-c", str(config))
    assert fit.returncode == 0, fit.stdout + fit.stderr
    assert "fits     raven-v4: weights" in fit.stdout and "state" in fit.stdout
