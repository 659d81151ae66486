"""Tensor models through onnxruntime beside the language model: MQTT infer topic and HTTP /v1/infer."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest

from appliance.catalog import sha256_file
from tests.support import tiny_models, tiny_onnx
from tests.support.harness import http_post


@pytest.fixture(scope="module")
def onnx_catalog(models_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    classifier = tiny_onnx.write_classifier(d / "activity.onnx")
    anomaly = tiny_onnx.write_anomaly(d / "anomaly.onnx")
    typed = tiny_onnx.write_typed(d / "typed.onnx")
    tiny = models_dir / "tiny-q4_0.gguf"
    catalog = d / "catalog.toml"
    catalog.write_text(f'''
{tiny_models.catalog_entry("tiny", tiny, absolute=True, template="chatml")}
[[models]]
id = "activity"
file = "activity.onnx"
sha256 = "{sha256_file(classifier)}"
family = "bert"
licence = "test"

[[models.inputs]]
name = "features"
shape = ["batch", 4]
dtype = "float32"

[[models.outputs]]
name = "probabilities"
labels = {json.dumps(tiny_onnx.CLASSES)}

[[models]]
id = "anomaly"
file = "anomaly.onnx"
sha256 = "{sha256_file(anomaly)}"

[[models.inputs]]
name = "reading"
shape = [-1, 8]

[[models.outputs]]
name = "score"
labels = ["normal", "anomaly"]
threshold = 2.0

[[models]]
id = "typed"
file = "typed.onnx"
sha256 = "{sha256_file(typed)}"

[[models.inputs]]
name = "ids"
shape = [-1, 3]
dtype = "int64"

[[models.inputs]]
name = "mask"
shape = [-1, 3]
dtype = "bool"
''')
    return catalog


@pytest.fixture
def app(appliance_factory, onnx_catalog):
    return appliance_factory("tiny", {"models": {"catalog": str(onnx_catalog)}, "worker": {"max_queue": 64}})


def test_classifier_over_mqtt_and_http(app, mqtt_client):
    features = np.array([[0.3, -1.2, 2.0, 0.5], [1.0, 0.0, -0.5, 0.1]], dtype=np.float32)
    expected = tiny_onnx.classify(features)
    reply = mqtt_client().request(app.topic("infer/activity"), {"id": "r1", "inputs": {"features": features.tolist()}})
    final = reply[-1]
    assert final["type"] == "result" and final["id"] == "r1" and final["model"] == "activity"
    out = final["outputs"]["probabilities"]
    assert np.allclose(out["values"], expected, atol=1e-6) and out["shape"] == [2, 3]
    assert out["labels"] == [tiny_onnx.CLASSES[i] for i in expected.argmax(axis=1)]
    assert out["scores"][0] == pytest.approx(dict(zip(tiny_onnx.CLASSES, expected[0].tolist(), strict=True)))
    status, body = http_post(app.http_url + "/v1/infer/activity", {"inputs": {"features": features[0].tolist()}})
    assert status == 200 and np.allclose(body["outputs"]["probabilities"]["values"], expected[:1], atol=1e-6)


def test_anomaly_threshold(app):
    normal = tiny_onnx.ANOMALY_CENTRE + 0.1
    odd = tiny_onnx.ANOMALY_CENTRE + 3.0
    status, body = http_post(app.http_url + "/v1/infer/anomaly", {"inputs": {"reading": [normal.tolist(),
                                                                                         odd.tolist()]}})
    assert status == 200
    assert body["outputs"]["score"]["labels"] == ["normal", "anomaly"]
    expected = tiny_onnx.anomaly_score(np.stack([normal, odd]))
    assert np.allclose(body["outputs"]["score"]["values"], expected, atol=1e-5)


@pytest.mark.parametrize("inputs, param, words", [
    ({"feature": [1, 2, 3, 4]}, "inputs.feature", "unknown input 'feature'"),
    ({}, "inputs.features", "input 'features' is missing"),
    ({"features": [1, 2, 3]}, "inputs.features", "has shape (1, 3); the model takes (any, 4)"),
    ({"features": [[1, 2], [3, 4, 5, 6]]}, "inputs.features", "rectangular"),
    ({"features": ["a", "b", "c", "d"]}, "inputs.features", "rectangular"),
    # refused while the payload is decoded (JSON has no NaN), before any field is looked at
    ({"features": [1, 2, float("nan"), 4]}, None, "NaN is not a number JSON allows"),
    ("not an object", "inputs", "'inputs' must be an object"),
])
def test_bad_tensors_are_refused_by_name(app, mqtt_client, inputs, param, words):
    final = mqtt_client().request(app.topic("infer/activity"), json.dumps({"inputs": inputs}).encode())[-1]
    assert final["type"] == "error" and final["error"]["code"] == "bad_request"
    assert final["error"].get("param") == param and words in final["error"]["message"]
    assert http_post(app.http_url + "/v1/infer/activity", {"inputs": {"features": [0, 0, 0, 0]}})[0] == 200


def test_models_of_the_other_kind_are_refused(app, mqtt_client):
    client = mqtt_client()
    wrong = client.request(app.topic("generate"), {"model": "activity", "prompt": "hi"})[-1]
    assert wrong["error"]["code"] == "bad_request" and "/v1/infer/activity" in wrong["error"]["message"]
    unknown = client.request(app.topic("infer/tiny"), {"inputs": {}})[-1]
    assert unknown["error"]["code"] == "unknown_model"
    status, body = http_post(app.http_url + "/v1/infer/nope", {"inputs": {}})
    assert status == 404 and body["error"]["code"] == "unknown_model"
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert status == 200, "the language model keeps working beside them"


def test_many_sensors_in_parallel_all_answered_correctly(app, mqtt_client):
    rng = np.random.default_rng(5)
    readings = {f"s{i}": rng.standard_normal((1, 4)).astype(np.float32) for i in range(40)}
    clients = [mqtt_client() for _ in range(4)]
    reply_topic = f"test/sensors/{uuid.uuid4().hex}"
    for c in clients:
        c.subscribe(reply_topic)

    def send(client, ids):
        for rid in ids:
            client.publish(app.topic("infer/activity"), {"id": rid, "inputs": {"features": readings[rid].tolist()}},
                           response_topic=reply_topic, correlation=rid.encode())

    ids = sorted(readings)
    threads = [threading.Thread(target=send, args=(c, ids[i::4])) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = clients[0].wait_for(lambda m: m.topic == reply_topic, count=len(ids), timeout=30)
    answers = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in got}
    assert sorted(answers) == ids
    for rid, answer in answers.items():
        assert np.allclose(answer["outputs"]["probabilities"]["values"], tiny_onnx.classify(readings[rid]),
                           atol=1e-6), rid


def test_integer_and_bool_inputs_pass_exactly(app):
    big = 2**40 + 1  # not exact in float32: a detour through a float would change the sum
    status, body = http_post(app.http_url + "/v1/infer/typed", {"inputs": {"ids": [[big, 5, 7], [1, 2, 3.0]],
                                                                           "mask": [[True, False, True],
                                                                                    [True, True, True]]}})
    assert status == 200, body
    assert body["outputs"]["total"]["values"] == [[big + 7], [6]], "3.0 is an integer; values kept exactly"


@pytest.mark.parametrize("model, inputs, param, words", [
    ("typed", {"ids": [[1.5, 2, 3]], "mask": [[True, True, True]]}, "inputs.ids", ["int64", "1.5 is not an integer"]),
    ("typed", {"ids": [[1, 2, 2**63]], "mask": [[True, True, True]]}, "inputs.ids", ["int64", "outside its range"]),
    ("typed", {"ids": [[1, True, 3]], "mask": [[True, True, True]]}, "inputs.ids", ["int64", "true and false"]),
    ("typed", {"ids": [[1, 2, 3]], "mask": [[1, 0, 1]]}, "inputs.mask", ["bool", "true or false"]),
    ("activity", {"features": [True, 0.5, 0, 0]}, "inputs.features", ["float32", "true and false"]),
])
def test_values_that_do_not_fit_the_dtype_are_refused(app, mqtt_client, model, inputs, param, words):
    """Before, numpy cast them quietly: 1.5 became 1 for an int64 input and 1/0 became true/false for a bool one."""
    final = mqtt_client().request(app.topic(f"infer/{model}"), {"inputs": inputs})[-1]
    assert final["type"] == "error" and final["error"]["code"] == "bad_request", final
    assert final["error"]["param"] == param
    assert all(w in final["error"]["message"] for w in words), final["error"]["message"]
    status, body = http_post(app.http_url + f"/v1/infer/{model}", {"inputs": inputs})
    assert status == 400 and body["error"]["code"] == "bad_request" and body["error"]["param"] == param


def test_infer_replies_echo_the_correlation_data_over_mqtt_v5(app, mqtt_client):
    client = mqtt_client("5")
    topic = f"test/infer/{uuid.uuid4().hex}"
    client.subscribe(topic)
    good, bad = b"\x00\xffcorr-1", b"\x01\xfe\x80corr-2"  # not UTF-8: echoed as bytes, byte for byte
    client.publish(app.topic("infer/typed"), {"inputs": {"ids": [1, 2, 3], "mask": [True, True, False]}},
                   response_topic=topic, correlation=good)
    client.publish(app.topic("infer/typed"), {"inputs": {"ids": [1.5, 2, 3], "mask": [True, True, False]}},
                   response_topic=topic, correlation=bad)
    got = client.wait_for(lambda m: m.topic == topic, count=2, timeout=30)
    by_correlation = {m.properties.CorrelationData: json.loads(m.payload) for m in got}
    assert set(by_correlation) == {good, bad}
    assert by_correlation[good]["type"] == "result" and by_correlation[good]["outputs"]["total"]["values"] == [[3]]
    assert by_correlation[bad]["type"] == "error" and by_correlation[bad]["error"]["param"] == "inputs.ids"
