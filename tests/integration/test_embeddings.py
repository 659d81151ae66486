"""Embeddings on the real built-in embedder (all-MiniLM-L6-v2 int8, the file requirements/embedding-model.txt
installs), driven by the real ``openai`` and ``ollama`` clients and over MQTT on the real mosquitto, behind an API
key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.catalog import default_embedder
from tests.support import tiny_models
from tests.support.harness import http_post

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

API_KEY = "an-api-key-for-embedding-tests-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = default_embedder.MODEL_ID
CAT = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def embed_catalog(models_dir, tmp_path_factory):
    model = default_embedder.installed_file(*default_embedder.MODEL)
    tokenizer = default_embedder.installed_file(*default_embedder.TOKENIZER)
    if model is None or tokenizer is None:
        pytest.skip(f"the embedding model is not installed ({default_embedder.INSTALL_HINT})")
    d = tmp_path_factory.mktemp("embed")
    catalog = d / "catalog.toml"
    inputs = "".join(f'\n[[models.inputs]]\nname = "{n}"\ndtype = "int64"\nshape = ["batch", "sequence"]\n'
                     for n in ("input_ids", "attention_mask", "token_type_ids"))
    catalog.write_text(f'''{tiny_models.catalog_entry("tiny", models_dir / "tiny-q4_0.gguf", absolute=True,
                                                       template="chatml")}
[[models]]
id = "{MODEL}"
file = "{model}"
sha256 = "{default_embedder.MODEL_SHA256}"
licence = "{default_embedder.LICENCE}"
role = "embedder"
tokenizer = "{tokenizer}"
max_tokens = {default_embedder.MAX_TOKENS}
{inputs}''')
    return catalog


@pytest.fixture(scope="module")
def app(embed_catalog, tmp_path_factory, broker):
    from tests.conftest import _assert_no_swallowed_errors
    from tests.support.harness import new_appliance

    workdir = tmp_path_factory.mktemp("embed-app")
    key_file = workdir / "key"
    key_file.write_text(API_KEY + "\n")
    instance = new_appliance(workdir, broker.port, embed_catalog, "tiny",
                             {"http": {"api_key_file": str(key_file)}, "worker": {"max_queue": 16}})
    instance.start(wait=False)
    instance.readyz_until("ready", headers=AUTH)
    yield instance
    instance.stop()
    _assert_no_swallowed_errors(instance)


def _cosine(a, b) -> float:
    return float(np.dot(a, b))  # both are unit vectors


def test_openai_client(app):
    client = openai.OpenAI(base_url=app.http_url + "/v1", api_key=API_KEY)
    # the client asks for base64 unless told otherwise, and decodes it; ask for floats too
    for encoding in (None, "float"):
        kwargs = {"encoding_format": encoding} if encoding else {}
        answer = client.embeddings.create(model=MODEL, input=CAT, **kwargs)
        vectors = np.array([d.embedding for d in answer.data])
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == MODEL
        assert vectors.shape == (3, default_embedder.DIMENSIONS)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.3
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > 3 * 3
    single = client.embeddings.create(model=MODEL, input=CAT[2], encoding_format="float").data[0].embedding
    assert _cosine(single, vectors[2]) > 0.999  # batched (padded) and alone: the same vector, to int8 rounding
    assert MODEL not in [m.id for m in client.models.list().data]  # chat clients offer every listed model
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=[])
    assert err.value.body["code"] == "bad_request" and err.value.body["param"] == "input"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="a text model is not an embedder")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.http_url + "/v1", api_key="wrong").embeddings.create(model=MODEL, input="x")


def test_ollama_client(app):
    client = ollama.Client(host=app.http_url, timeout=60, headers=AUTH)
    answer = client.embed(model=MODEL + ":latest", input=CAT)
    vectors = np.array(answer.embeddings)
    assert answer.model == MODEL + ":latest" and vectors.shape == (3, default_embedder.DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.3
    assert answer.prompt_eval_count > 9 and answer.total_duration > 0
    one = client.embed(model=MODEL, input=CAT[0], keep_alive="5m")
    assert _cosine(one.embeddings[0], vectors[0]) > 0.999
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input=["fine", ""])
    assert err.value.status_code == 400 and "input[1]" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input="x", dimensions=64)
    assert err.value.status_code == 400 and "dimensions" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=app.http_url, timeout=60).embed(model=MODEL, input="no key")
    assert err.value.status_code == 401


def test_over_long_input_is_refused_unless_truncated(app):
    long = "word " * 300  # 300 word pieces + [CLS] + [SEP] > 256
    status, body = http_post(app.http_url + "/v1/embeddings", {"model": MODEL, "input": ["short", long]},
                             headers=AUTH)
    error = body["error"]
    assert status == 400 and error["code"] == "bad_request" and error["param"] == "input[1]"
    assert "302 tokens" in error["message"] and "at most 256" in error["message"]
    status, body = http_post(app.http_url + "/v1/embeddings", {"model": MODEL, "input": long, "truncate": True},
                             headers=AUTH)
    assert status == 200 and body["usage"]["prompt_tokens"] == 256
    status, body = http_post(app.http_url + "/api/embed", {"model": MODEL, "input": long}, headers=AUTH)
    assert status == 400 and body["code"] == "bad_request" and "at most 256" in body["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": ["a", 3]}, "input[1]"),
    ({"model": MODEL, "input": [[101, 2023]]}, "input[0]"),
    ({"model": MODEL, "input": {"text": "a"}}, "input"),
    ({"input": "a"}, "model"),
    ({"model": MODEL, "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"model": MODEL, "input": "a", "dimensions": 128}, "dimensions"),
    ({"model": MODEL, "input": "a", "colour": "blue"}, "colour"),
])
def test_bad_requests_name_the_field(app, body, param):
    status, answer = http_post(app.http_url + "/v1/embeddings", body, headers=AUTH)
    assert status == 400 and answer["error"]["code"] == "bad_request" and answer["error"]["param"] == param


def test_mqtt(app, mqtt_client):
    client = mqtt_client()
    final = client.request(app.topic("embed"), {"id": "e1", "input": CAT})[-1]
    assert final["type"] == "result" and final["id"] == "e1" and final["model"] == MODEL
    vectors = np.array(final["embeddings"])
    assert vectors.shape == (3, default_embedder.DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.3
    assert final["usage"]["tokens"] > 9 and final["timings"]["inference_ms"] > 0
    status, body = http_post(app.http_url + "/v1/embeddings", {"model": MODEL, "input": CAT,
                                                               "encoding_format": "float"}, headers=AUTH)
    assert np.allclose([d["embedding"] for d in body["data"]], vectors, atol=1e-6)  # one model, one answer
    for payload, param in (({"id": "e2", "input": []}, "input"), ({"id": "e3", "input": [None]}, "input[0]"),
                           ({"id": "e4", "input": "x", "model": "tiny"}, "model")):
        final = client.request(app.topic("embed"), json.dumps(payload).encode())[-1]
        assert final["type"] == "error" and final["id"] == payload["id"]
        assert final["error"]["param"] == param
    final = client.request(app.topic("embed"), {"id": "e5", "input": "word " * 300})[-1]
    assert final["error"]["code"] == "bad_request" and "at most 256" in final["error"]["message"]


def test_mqtt_under_the_shipped_acl(embed_catalog, shipped_broker, appliance_factory, tmp_path):
    """With accounts, a sensor sends on embed/<its user name> and hears the answer under replies/<its name>/; the
    broker drops a request sent under another account's name."""
    users = {"appliance": "pw-appliance-0", "sensor1": "pw-sensor1-00"}
    broker = shipped_broker(users)
    password = tmp_path / "mqtt-password"
    password.write_text(users["appliance"] + "\n")
    app = appliance_factory("tiny", {"models": {"catalog": str(embed_catalog)},
                                     "mqtt": {"port": broker.port, "username": "appliance",
                                              "password_file": str(password)}})
    from tests.support.harness import MqttClient
    sensor = MqttClient(broker.host, broker.lan_port, username="sensor1", password=users["sensor1"])
    try:
        sensor.subscribe("replies/sensor1/#")
        sensor.publish(app.topic("embed/appliance"), {"id": "not-mine", "input": "x"},
                       response_topic="replies/sensor1/other", correlation=b"0")
        sensor.publish(app.topic("embed/sensor1"), {"id": "mine", "input": CAT[:2]},
                       response_topic="replies/sensor1/embed", correlation=b"1")
        (message,) = sensor.wait_for(lambda m: m.topic == "replies/sensor1/embed", timeout=30)
        final = json.loads(message.payload)
        assert final["type"] == "result" and final["id"] == "mine" and len(final["embeddings"]) == 2
        assert not [m for m in sensor.messages if m.topic == "replies/sensor1/other"]
    finally:
        sensor.close()


def test_built_in_catalog_serves_the_embedder(default_app):
    """`make run` without a catalog file: the default chat model and the built-in embedder, side by side."""
    if default_embedder.entry() is None:
        pytest.skip(f"the embedding model is not installed ({default_embedder.INSTALL_HINT})")
    client = openai.OpenAI(base_url=default_app.http_url + "/v1", api_key="unused")
    vectors = [d.embedding for d in client.embeddings.create(model=MODEL, input=CAT).data]
    assert len(vectors) == 3 and _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2])
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
