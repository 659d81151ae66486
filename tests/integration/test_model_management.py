"""Catalog features of the model families: LoRA adapters, quantize and add, licences, unsupported architectures."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from appliance.catalog import Catalog, sha256_file
from tests.support import tiny_models
from tests.support.harness import run_cli

llama_cpp = pytest.importorskip("llama_cpp")


def write_opt(path: Path) -> Path:
    """A GGUF that says it is an OPT model, an architecture llama.cpp does not have."""
    import gguf
    writer = gguf.GGUFWriter(str(path), "opt")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    tiny_models.write_llama(d / "base-f32.gguf", seed=11)
    tiny_models.write_lora(d / "alpaca-lora.gguf", seed=12)
    write_opt(d / "opt-125m.gguf")
    return d


def _catalog(d: Path, text: str) -> Path:
    path = d / f"catalog-{abs(hash(text))}.toml"
    path.write_text(text)
    return path


def test_lora_adapter_changes_the_output_and_is_stable(appliance_factory, mqtt_client, family_dir):
    base, lora = family_dir / "base-f32.gguf", family_dir / "alpaca-lora.gguf"
    catalog = _catalog(family_dir, f'''
[[models]]
id = "base"
file = "{base.name}"
sha256 = "{sha256_file(base)}"
template = "alpaca"

[[models]]
id = "alpaca-lora"
file = "{base.name}"
sha256 = "{sha256_file(base)}"
family = "alpaca-lora"
template = "alpaca"
commercial_use = "unknown"
lora = "{lora.name}"
lora_sha256 = "{sha256_file(lora)}"
lora_scale = 1.0
''')
    app = appliance_factory("base", {"models": {"catalog": str(catalog)}})
    client = mqtt_client()

    def text(model: str) -> str:
        final = client.request(app.topic("generate"), {"model": model, "prompt": "the cat is", "max_tokens": 24,
                                                       "temperature": 0})[-1]
        assert final["type"] == "result", final
        return final["text"]

    plain, adapted = text("base"), text("alpaca-lora")
    assert plain != adapted
    assert text("alpaca-lora") == adapted and text("base") == plain, "stable across runs and model switches"
    direct = llama_cpp.Llama(str(base), n_ctx=512, n_batch=256, n_threads=2, verbose=False, lora_path=str(lora))
    expected = direct.create_completion("the cat is", max_tokens=24, temperature=0)["choices"][0]["text"]
    direct.close()
    assert adapted == expected, "the same text llama-cpp-python gives with the same adapter"

    lora.write_bytes(lora.read_bytes() + b"tampered")  # a changed adapter is refused like a changed model
    try:
        refused = client.request(app.topic("generate"), {"model": "alpaca-lora", "prompt": "x", "max_tokens": 2})[-1]
    finally:
        tiny_models.write_lora(lora, seed=12)
    assert refused["error"]["code"] == "model_error"
    assert "sha256 mismatch" in refused["error"]["message"] and lora.name in refused["error"]["message"]
    assert text("base") == plain, "the base model keeps serving"


def test_quantize_adds_a_working_model(appliance_factory, mqtt_client, family_dir, tmp_path):
    source = family_dir / "base-f32.gguf"
    catalog = tmp_path / "catalog.toml"
    out = run_cli("models", "quantize", str(source), str(tmp_path / "base-q4_0.gguf"), "--type", "q4_0",
                  "--family", "alpaca", "--id", "base-q4", "--catalog", str(catalog))
    assert out.returncode == 0, out.stderr
    assert "converting to q4_0" in out.stderr, "llama.cpp's per-tensor progress is shown"
    assert "added base-q4" in out.stdout
    entry = Catalog.load(catalog).get("base-q4")
    assert entry.sha256 == sha256_file(tmp_path / "base-q4_0.gguf") and entry.template == "alpaca"
    assert entry.commercial_use is False and "LLaMA-1" in entry.licence
    app = appliance_factory("base-q4", {"models": {"catalog": str(catalog), "allow_noncommercial": True}})
    final = mqtt_client().request(app.topic("generate"), {"prompt": "the cat", "max_tokens": 5})[-1]
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 5


def test_models_add_reads_the_gguf_and_refuses_duplicates(family_dir, tmp_path):
    chat = tiny_models.write_llama(tmp_path / "chatty.gguf", chat_template=tiny_models.CHAT_TEMPLATE)
    catalog = tmp_path / "catalog.toml"
    out = run_cli("models", "add", str(chat), "--family", "dolly", "--catalog", str(catalog))
    assert out.returncode == 0, out.stderr
    assert "architecture llama" in out.stdout and "context 512" in out.stdout and "chat_template True" in out.stdout
    raw = tomllib.loads(catalog.read_text())["models"][0]
    assert raw["id"] == "chatty" and raw["file"] == "chatty.gguf" and "template" not in raw, \
        "the GGUF's own chat template wins: no named template"
    assert raw["commercial_use"] is True and raw["licence"].startswith("MIT")
    again = run_cli("models", "add", str(chat), "--family", "dolly", "--catalog", str(catalog))
    assert again.returncode == 2 and "already in the catalog" in again.stderr
    out = run_cli("models", "add", str(family_dir / "base-f32.gguf"), "--family", "vicuna", "--id", "vic",
                  "--catalog", str(catalog))
    assert out.returncode == 0, out.stderr
    vic = Catalog.load(catalog).get("vic")
    assert vic.template == "vicuna" and vic.commercial_use is False and vic.path == family_dir / "base-f32.gguf"


def test_unsupported_architecture_at_add_and_at_load(appliance_factory, mqtt_client, family_dir, tmp_path):
    opt = family_dir / "opt-125m.gguf"
    catalog = tmp_path / "catalog.toml"
    out = run_cli("models", "add", str(opt), "--family", "opt", "--catalog", str(catalog))
    assert out.returncode == 1 and "architecture 'opt' is not supported" in out.stderr
    assert "no route in this appliance" in out.stderr and "Pythia" in out.stderr, "says what to run instead"
    assert not catalog.exists(), "nothing was added"
    tiny = family_dir / "base-f32.gguf"
    catalog.write_text(f'[[models]]\nid = "tiny"\nfile = "{tiny}"\nsha256 = "{sha256_file(tiny)}"\n\n'
                       f'[[models]]\nid = "opt"\nfile = "{opt}"\nsha256 = "{sha256_file(opt)}"\n')
    app = appliance_factory("tiny", {"models": {"catalog": str(catalog)}})
    client = mqtt_client()
    final = client.request(app.topic("generate"), {"model": "opt", "prompt": "hi", "max_tokens": 3})[-1]
    assert final["error"]["code"] == "unsupported_architecture" and "no route" in final["error"]["message"]
    assert "as ONNX" not in final["error"]["message"], "the onnx backend cannot generate text: never offered for it"
    assert client.request(app.topic("generate"), {"prompt": "hi", "max_tokens": 3})[-1]["type"] == "result"


def test_research_only_models_need_the_operator_to_allow_them(appliance_factory, mqtt_client, family_dir,
                                                              tmp_path):
    base = family_dir / "base-f32.gguf"
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'''
[[models]]
id = "open"
file = "{base}"
sha256 = "{sha256_file(base)}"
licence = "Apache-2.0"
commercial_use = true

[[models]]
id = "baize-7b"
file = "{base}"
sha256 = "{sha256_file(base)}"
family = "baize"
licence = "research only: LLaMA-1 weights"
commercial_use = false
''')
    app = appliance_factory("open", {"models": {"catalog": str(catalog)}})
    refused = mqtt_client().request(app.topic("generate"), {"model": "baize-7b", "prompt": "hi"})[-1]
    assert refused["error"]["code"] == "model_error"
    assert "research only: LLaMA-1 weights" in refused["error"]["message"]
    assert "models.allow_noncommercial" in refused["error"]["message"]
    listed = run_cli("models", "list", env={"APPLIANCE_MODELS_CATALOG": str(catalog),
                                            "APPLIANCE_MODELS_DEFAULT": "open"})
    assert "NON-COMMERCIAL only (refused: models.allow_noncommercial is false)" in listed.stdout

    degraded = appliance_factory("baize-7b", {"models": {"catalog": str(catalog)}}, start=False).start(wait=False)
    status, body = degraded.readyz_until("degraded")[-1]
    assert "non-commercial" in body["reason"]

    allowed = appliance_factory("baize-7b", {"models": {"catalog": str(catalog), "allow_noncommercial": True}})
    assert mqtt_client().request(allowed.topic("generate"), {"prompt": "hi", "max_tokens": 2})[-1]["type"] == "result"


def test_models_add_reads_an_onnx_graph_into_a_valid_entry(appliance_factory, family_dir, tmp_path):
    from tests.support import tiny_onnx
    from tests.support.harness import http_post
    classifier = tiny_onnx.write_classifier(tmp_path / "activity.onnx")
    typed = tiny_onnx.write_typed(tmp_path / "typed.onnx")
    catalog = tmp_path / "catalog.toml"
    assert run_cli("models", "add", str(family_dir / "base-f32.gguf"), "--family", "llama-2", "--id", "base",
                   "--catalog", str(catalog)).returncode == 0
    out = run_cli("models", "add", str(classifier), "--family", "bert", "--labels", ",".join(tiny_onnx.CLASSES),
                  "--catalog", str(catalog))
    assert out.returncode == 0, out.stderr
    assert "inputs features float32 ['batch', 4]" in out.stdout and "outputs probabilities" in out.stdout
    out = run_cli("models", "add", str(typed), "--family", "bert", "--catalog", str(catalog))
    assert out.returncode == 0, out.stderr
    loaded = Catalog.load(catalog)
    activity, typed_entry = loaded.get("activity"), loaded.get("typed")
    assert activity.backend == "onnx" and activity.template is None and activity.sha256 == sha256_file(classifier)
    assert [(i.name, i.dtype, i.shape) for i in activity.inputs] == [("features", "float32", (None, 4))]
    assert [(o.name, o.labels) for o in activity.outputs] == [("probabilities", tuple(tiny_onnx.CLASSES))]
    assert [(i.name, i.dtype, i.shape) for i in typed_entry.inputs] == [("ids", "int64", (None, 3)),
                                                                         ("mask", "bool", (None, 3))]
    assert [o.name for o in typed_entry.outputs] == ["total"] and not typed_entry.outputs[0].labels

    app = appliance_factory("base", {"models": {"catalog": str(catalog)}})
    status, body = http_post(app.http_url + "/v1/infer/activity", {"inputs": {"features": [0.3, -1.2, 2.0, 0.5]}})
    assert status == 200 and body["outputs"]["probabilities"]["labels"] == [
        tiny_onnx.CLASSES[int(tiny_onnx.classify(np.array([[0.3, -1.2, 2.0, 0.5]])).argmax())]]
    status, body = http_post(app.http_url + "/v1/infer/typed", {"inputs": {"ids": [4, 5, 6], "mask": [True] * 3}})
    assert status == 200 and body["outputs"]["total"]["values"] == [[15]]


def test_models_add_refuses_what_an_onnx_entry_cannot_hold(family_dir, tmp_path):
    from tests.support import tiny_onnx
    anomaly = tiny_onnx.write_anomaly(tmp_path / "anomaly.onnx")
    catalog = tmp_path / "catalog.toml"
    out = run_cli("models", "add", str(anomaly), "--family", "bert", "--labels", "a,b,c", "--threshold", "2",
                  "--catalog", str(catalog))
    assert out.returncode == 2 and "outputs[0].threshold" in out.stderr and not catalog.exists()
    typed = tiny_onnx.write_typed(tmp_path / "typed.onnx")
    out = run_cli("models", "add", str(typed), "--family", "bert", "--featurize", "hashed-words",
                  "--catalog", str(catalog))
    assert out.returncode == 2 and "featurize = 'hashed-words'" in out.stderr and "exactly one input" in out.stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    out = run_cli("models", "add", str(broken), "--family", "bert", "--catalog", str(catalog))
    assert out.returncode == 1 and "onnxruntime cannot load it" in out.stderr
    out = run_cli("models", "add", str(family_dir / "base-f32.gguf"), "--family", "llama", "--labels", "a,b",
                  "--catalog", str(catalog))
    assert out.returncode == 1 and "are for ONNX models" in out.stderr


def test_the_catalog_template_wins_over_the_embedded_one(appliance_factory, mqtt_client, models_dir, tmp_path):
    """tiny-chat.gguf embeds a Jinja chat template (conftest); an entry naming `template = "alpaca"` is rendered
    with Stanford Alpaca's format instead, while the entry without one keeps the embedded template."""
    from appliance.backends import templates
    from appliance.protocol import Message
    chat = models_dir / "tiny-chat.gguf"
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[models]]\nid = "embedded"\nfile = "{chat}"\nsha256 = "{sha256_file(chat)}"\n\n'
                       f'[[models]]\nid = "alpaca"\nfile = "{chat}"\nsha256 = "{sha256_file(chat)}"\n'
                       f'template = "alpaca"\n')
    messages = [{"role": "user", "content": "Name a colour."}]
    alpaca = templates.render("alpaca", [Message(**m) for m in messages])
    llm = llama_cpp.Llama(str(chat), n_ctx=512, n_batch=256, n_threads=2, verbose=False)
    try:
        alpaca_tokens = llm.tokenize(alpaca.text.encode(), add_bos=True, special=True)
        expected = llm.create_completion(alpaca.text, max_tokens=12, temperature=0, stop=list(alpaca.stop))
        embedded = llm.create_chat_completion(messages, max_tokens=12, temperature=0)
    finally:
        llm.close()
    assert embedded["usage"]["prompt_tokens"] != len(alpaca_tokens), "the two formats must be told apart"

    app = appliance_factory("embedded", {"models": {"catalog": str(catalog)}})
    client = mqtt_client()
    got = client.request(app.topic("generate"), {"model": "alpaca", "messages": messages, "max_tokens": 12,
                                                 "temperature": 0})[-1]
    assert got["type"] == "result", got
    assert got["usage"]["prompt_tokens"] == len(alpaca_tokens), "the prompt is the Alpaca rendering"
    assert got["text"] == expected["choices"][0]["text"]
    own = client.request(app.topic("generate"), {"model": "embedded", "messages": messages, "max_tokens": 12,
                                                 "temperature": 0})[-1]
    assert own["usage"]["prompt_tokens"] == embedded["usage"]["prompt_tokens"]
    assert own["text"] == embedded["choices"][0]["message"]["content"]
