"""Embeddings without the appliance running: the worker's tokenize -> run -> mean-pool -> normalise on a tiny
generated ONNX model and tokenizer.json, the request shapes of the three dialects, and the catalog's checks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from appliance.backends.onnx import OnnxSessions
from appliance.catalog import Catalog, default_embedder
from appliance.errors import BadRequest, ConfigError
from appliance.protocol import EmbedResult
from appliance.tensors import embed_api
from appliance.tensors.embedder import Embedder, mean_pool_normalise
from tests.support import tiny_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def embedder_entry(tmp_path_factory):
    d = tmp_path_factory.mktemp("embedder")
    model, tokenizer = tiny_onnx.write_embedder(d / "embed.onnx", d / "tokenizer.json")
    (d / "catalog.toml").write_text(tiny_onnx.embedder_entry(model, tokenizer, max_tokens=6))
    return Catalog.load(d / "catalog.toml").get("tiny-embed")


def test_mean_pooling_leaves_padding_out_and_normalises():
    hidden = np.array([[[1, 0], [3, 0], [100, 100]], [[0, 2], [0, 0], [0, 0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool_normalise(hidden, mask)
    assert np.allclose(pooled, [[1, 0], [0, 1]])
    assert np.allclose(mean_pool_normalise(np.zeros((1, 2, 2)), np.ones((1, 2))), 0)  # no NaN for a zero vector


def test_embedder_batches_pools_and_normalises(embedder_entry):
    embedder = Embedder(OnnxSessions(verify=True))
    texts = ["cat", "Red car dog cat", "cat zebra"]  # lengths 3, 6 and 4 tokens: padded to 6 in one batch
    result = embedder.embed(embedder_entry, texts, truncate=False)
    expected = [tiny_onnx.embed_reference(t.lower().split()) for t in texts]
    assert np.allclose(result.vectors, expected, atol=1e-6)
    assert result.tokens == 3 + 6 + 4  # the tokenizer file's own truncation (4) is not the model's limit
    alone = embedder.embed(embedder_entry, texts[:1], truncate=False)
    assert np.allclose(alone.vectors[0], result.vectors[0], atol=1e-6)


def test_over_long_text_is_refused_naming_the_limit_or_truncated(embedder_entry):
    embedder = Embedder(OnnxSessions(verify=False))
    long = "cat dog car red cat dog"  # 8 tokens with [CLS] and [SEP]; the entry's limit is 6
    with pytest.raises(BadRequest) as err:
        embedder.embed(embedder_entry, ["cat", long], truncate=False)
    assert err.value.param == "input[1]" and "8 tokens" in err.value.message and "at most 6" in err.value.message
    cut = embedder.embed(embedder_entry, [long], truncate=True)
    assert cut.tokens == 6
    assert np.allclose(cut.vectors[0], tiny_onnx.embed_reference(["cat", "dog", "car", "red"]), atol=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": ""}, "input"),
    ({"model": "m", "input": ["a", None]}, "input[1]"),
    ({"model": "m", "input": [1, 2, 3]}, "input[0]"),
    ({"model": "m", "input": ["a"] * (embed_api.MAX_INPUTS + 1)}, "input"),
    ({"input": "a"}, "model"),
    ({"model": 3, "input": "a"}, "model"),
    ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "m", "input": "a", "dimensions": 8}, "dimensions"),
    ({"model": "m", "input": "a", "truncate": "yes"}, "truncate"),
    ({"model": "m", "input": "a", "stream": True}, "stream"),
])
def test_openai_requests_are_checked_by_field(body, param):
    with pytest.raises(BadRequest) as err:
        embed_api.openai_request(body)
    assert err.value.param == param


def test_the_three_dialects():
    request, encoding = embed_api.openai_request({"model": "m", "input": "one", "user": "u"})
    assert request.texts == ("one",) and encoding == "float" and not request.truncate
    result = EmbedResult("r", "m", [[0.6, 0.8], [1.0, 0.0]], 7, 2.5)
    body = embed_api.openai_response(result, "base64")
    import base64
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, [0.6, 0.8]) and body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert embed_api.openai_response(result, "float")["data"][1] == {"object": "embedding", "index": 1,
                                                                     "embedding": [1.0, 0.0]}
    request = embed_api.ollama_request({"model": "m:latest", "input": ["a", "b"], "truncate": True,
                                        "keep_alive": "5m", "options": {}}, "m")
    assert request.model == "m" and request.truncate and request.texts == ("a", "b")
    assert embed_api.ollama_response(result, "m:latest")["embeddings"] == result.vectors
    with pytest.raises(BadRequest) as err:
        embed_api.ollama_request({"model": "m", "input": "a", "options": []}, "m")
    assert err.value.param == "options"
    request = embed_api.mqtt_request({"id": 4, "input": "a"})
    assert request.id == 4 and request.model is None
    with pytest.raises(BadRequest) as err:
        embed_api.mqtt_request({"id": 4.5, "input": "a"})
    assert err.value.param == "id"
    assert embed_api.mqtt_payload(result)["embeddings"] == result.vectors


def _catalog_problems(tmp_path, extra: str) -> list[str]:
    model, tokenizer = tiny_onnx.write_embedder(tmp_path / "e.onnx", tmp_path / "t.json")
    (tmp_path / "catalog.toml").write_text(tiny_onnx.embedder_entry(model, tokenizer).replace(
        'role = "embedder"\n', extra))
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    return err.value.problems


@pytest.mark.parametrize("extra, words", [
    ('role = "ranker"\n', "role = 'ranker': must be \"embedder\""),
    ('role = "embedder"\nfeaturize = "hashed-words"\n', "featurize"),
    ('role = "embedder"\nbackend = "llama_cpp"\n', "an embedder is an onnx model"),
    ("", "only rwkv models and onnx embedders name a tokenizer"),
])
def test_catalog_checks_embedder_entries(tmp_path, extra, words):
    assert any(words in p for p in _catalog_problems(tmp_path, extra))


def test_catalog_needs_a_token_limit(tmp_path):
    model, tokenizer = tiny_onnx.write_embedder(tmp_path / "e.onnx", tmp_path / "t.json")
    (tmp_path / "catalog.toml").write_text(tiny_onnx.embedder_entry(model, tokenizer).replace("max_tokens = 8\n", ""))
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    assert any("max_tokens = None" in p for p in err.value.problems)


def test_built_in_embedder_files_match_their_pins():
    entry = default_embedder.entry()
    if entry is None:
        pytest.skip(f"the embedding model is not installed ({default_embedder.INSTALL_HINT})")
    assert entry.path.stat().st_size == default_embedder.MODEL_SIZE
    assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == default_embedder.MODEL_SHA256
    assert entry.tokenizer is not None
    with open(entry.tokenizer, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == default_embedder.TOKENIZER_SHA256
