"""The family matrix: a tiny GGUF of every architecture behind the seed families, served through the appliance's
MQTT path; decoder-only ones give exactly llama-cpp-python's text, T5 runs through the encoder-decoder route, and the
ones llama.cpp cannot run are refused with `unsupported_architecture`, never a crash."""

from __future__ import annotations

import pytest

from appliance.catalog import sha256_file
from tests.support import tiny_archs
from tests.support.fresh_interpreter import llama_cpp_python_text

pytest.importorskip("llama_cpp")

# which seed families stand behind each architecture (docs/models.md has the full table)
FAMILIES = {"gptneox": "Dolly 2.0, OpenChatKit, Open Assistant (Pythia)", "falcon": "Falcon", "mpt": "MPT",
            "bloom": "BLOOM(Z)", "olmo": "OLMo", "chatglm": "ChatGLM2/3", "rwkv6": "RWKV World v6",
            "rwkv7": "RWKV v7", "t5": "Flan-T5", "qwen2": "Qwen2", "phi2": "Phi-2", "gpt2": "GPT-2",
            "starcoder": "StarCoder", "stablelm": "StableLM", "baichuan": "Baichuan", "gemma": "Gemma"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    files = {arch: tiny_archs.write(arch, d / f"{arch}.gguf")
             for arch in [*tiny_archs.ARCHITECTURES, *tiny_archs.ENCODER_DECODER, *tiny_archs.UNSUPPORTED]}
    catalog = d / "catalog.toml"
    catalog.write_text("\n".join(f'[[models]]\nid = "{arch}"\nfile = "{path.name}"\nsha256 = "{sha256_file(path)}"\n'
                                 f'template = "plain"\n' for arch, path in files.items()))
    return files, catalog


@pytest.fixture(scope="module")
def reference(matrix):
    """llama-cpp-python itself on every decoder-only file, one process per model: an abort must not take pytest, and
    loading several recurrent models one after another in one process changed the second one's output (seen with
    rwkv6 then rwkv7), which the appliance never does (one model per worker load)."""
    files, _ = matrix
    return {arch: llama_cpp_python_text(files[arch]) for arch in tiny_archs.ARCHITECTURES}


@pytest.fixture(scope="module")
def app(matrix, broker, tmp_path_factory):
    from tests.support.harness import new_appliance
    _, catalog = matrix
    instance = new_appliance(tmp_path_factory.mktemp("archs-app"), broker.port, catalog, "gptneox",
                             {"worker": {"max_queue": 32}})
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("arch", tiny_archs.ARCHITECTURES)
def test_decoder_architectures_generate_like_llama_cpp_python(app, mqtt_client, reference, arch):
    final = mqtt_client().request(app.topic("generate"), {"model": arch, "prompt": "hello there", "max_tokens": 8,
                                                          "temperature": 0})[-1]
    assert final["type"] == "result", (FAMILIES[arch], final)
    assert final["usage"]["completion_tokens"] == 8 and final["text"].replace("\n", "").isprintable()
    assert final["text"] == reference[arch]


def test_encoder_decoder_t5_generates(app, mqtt_client):
    client = mqtt_client()
    first = client.request(app.topic("generate"), {"model": "t5", "prompt": "translate: hello", "max_tokens": 8,
                                                   "temperature": 0, "stream": True})
    final = first[-1]
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 8
    assert final["text"].replace("\n", "").isprintable()
    assert "".join(c["delta"] for c in first[:-1]) == final["text"]
    again = client.request(app.topic("generate"), {"model": "t5", "prompt": "translate: hello", "max_tokens": 8,
                                                   "temperature": 0})[-1]
    assert again["text"] == final["text"], "deterministic at temperature 0"


@pytest.mark.parametrize("arch", sorted(tiny_archs.UNSUPPORTED))
def test_unsupported_architectures_are_refused_not_crashed(app, mqtt_client, arch):
    client = mqtt_client()
    final = client.request(app.topic("generate"), {"model": arch, "prompt": "hello", "max_tokens": 4})[-1]
    assert final["error"]["code"] == "unsupported_architecture" and arch in final["error"]["message"]
    assert app.status()["state"] == "ready", "no crash, no restart"
    assert client.request(app.topic("generate"), {"prompt": "hello", "max_tokens": 2})[-1]["type"] == "result"
