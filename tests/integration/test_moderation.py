"""The moderation filter: an ONNX text classifier built by the test, run on prompts and messages before the language
model, over MQTT and HTTP; off by default."""

from __future__ import annotations

import pytest

from appliance.catalog import Catalog
from appliance.config import load_config
from appliance.generation.moderation import config_problems
from appliance.tensors.features import hashed_words
from tests.support import tiny_models, tiny_onnx
from tests.support.harness import http_get, http_post, run_cli

SIZE = 64
FLAGGED = "forbidden"
ORDINARY = ["the cat is", "Say hello.", "hello there", "You are brief."]


@pytest.fixture(scope="module")
def moderation_catalog(models_dir, tmp_path_factory):
    # the classifier only knows the flagged word's bucket: no ordinary word may share it, or the test proves nothing
    bucket = hashed_words([FLAGGED], SIZE)[0].argmax()
    assert all(hashed_words([text], SIZE)[0][bucket] == 0 for text in ORDINARY)
    d = tmp_path_factory.mktemp("moderation")
    guard = tiny_onnx.write_text_classifier(d / "guard.onnx", [FLAGGED], SIZE)
    tiny = models_dir / "tiny-q4_0.gguf"
    catalog = d / "catalog.toml"
    catalog.write_text(tiny_models.catalog_entry("tiny", tiny, absolute=True, template="chatml")
                       + tiny_onnx.text_classifier_entry(guard, SIZE))
    return catalog


MODERATED = {"moderation": {"model": "guard", "block": "flagged", "threshold": 0.5}}


def _app(appliance_factory, catalog, extra=None):
    return appliance_factory("tiny", {"models": {"catalog": str(catalog)}, **(extra or {})})


def test_flagged_text_is_refused_over_mqtt_and_ordinary_text_answered(appliance_factory, mqtt_client,
                                                                      moderation_catalog):
    app = _app(appliance_factory, moderation_catalog, MODERATED)
    client = mqtt_client()
    refused = client.request(app.topic("generate"), {"id": "m1", "prompt": f"tell me the {FLAGGED} thing",
                                                     "max_tokens": 4, "stream": True})
    assert len(refused) == 1, "no chunk before the refusal: the language model never saw the text"
    error = refused[0]
    assert error["type"] == "error" and error["id"] == "m1" and error["error"]["code"] == "moderated"
    assert error["error"]["param"] == "prompt" and "'flagged' scored 0.98" in error["error"]["message"]
    assert FLAGGED not in error["error"]["message"], "the refusal never repeats the request's text"
    chat = client.request(app.topic("generate"), {"messages": [{"role": "user", "content": "Say hello."},
                                                               {"role": "assistant", "content": "hello there"},
                                                               {"role": "user", "content": f"now {FLAGGED.upper()}"}],
                                                  "max_tokens": 4})[-1]
    assert chat["error"]["code"] == "moderated" and chat["error"]["param"] == "messages[2]", chat
    ok = client.request(app.topic("generate"), {"prompt": "the cat is", "max_tokens": 4, "temperature": 0})[-1]
    assert ok["type"] == "result" and ok["usage"]["completion_tokens"] == 4
    ok_chat = client.request(app.topic("generate"), {"messages": [{"role": "system", "content": "You are brief."},
                                                                  {"role": "user", "content": "Say hello."}],
                                                     "max_tokens": 3})[-1]
    assert ok_chat["type"] == "result"
    assert app.metric('appliance_errors_total{code="moderated"}') == 2
    assert FLAGGED not in app.log_text(), "request text stays out of the log"


def test_flagged_text_is_refused_over_http(appliance_factory, moderation_catalog):
    app = _app(appliance_factory, moderation_catalog, MODERATED)
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": f"{FLAGGED}!", "max_tokens": 4})
    assert status == 400 and body["error"]["code"] == "moderated" and body["error"]["param"] == "prompt", body
    status, body = http_post(app.http_url + "/v1/chat/completions",
                             {"messages": [{"role": "system", "content": f"Be {FLAGGED}."},
                                           {"role": "user", "content": "Say hello."}], "max_tokens": 4})
    assert status == 400 and body["error"]["code"] == "moderated" and body["error"]["param"] == "messages[0]"
    status, body = http_post(app.http_url + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4})
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "the cat is", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    # the classifier's own calls are not requests of anyone's: only the four above are counted
    metrics = http_get(app.http_url + "/metrics")[1].decode()
    counted = [line for line in metrics.splitlines() if line.startswith("appliance_requests_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 4, counted


def test_with_the_filter_off_nothing_is_refused(appliance_factory, mqtt_client, moderation_catalog):
    app = _app(appliance_factory, moderation_catalog)  # the classifier is in the catalog, moderation.model is not set
    final = mqtt_client().request(app.topic("generate"), {"prompt": f"tell me the {FLAGGED} thing",
                                                          "max_tokens": 4})[-1]
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 4
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": f"{FLAGGED}!", "max_tokens": 3})
    assert status == 200, body


@pytest.mark.parametrize("keys, words", [
    ({"model": "nope"}, ["moderation.model = 'nope'", "not in the catalog"]),
    ({"model": "tiny"}, ["moderation.model = 'tiny'", "llama_cpp model"]),
    ({"model": "guard", "block": "toxic"}, ["moderation.block = 'toxic'", "labels: ok, flagged"]),
    ({"model": "guard", "output": "logits"}, ["moderation.output = 'logits'", "outputs: probabilities"]),
])
def test_bad_moderation_keys_are_refused_at_start_naming_the_key(moderation_catalog, tmp_path, keys, words):
    env = {f"APPLIANCE_MODERATION_{k.upper()}": v for k, v in keys.items()}
    problems = config_problems(load_config(None, env=env), Catalog.load(moderation_catalog))
    assert len(problems) == 1 and all(w in problems[0] for w in words), problems
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\ncatalog = "{moderation_catalog}"\ndefault = "tiny"\n')
    out = run_cli("models", "list", "-c", str(config), env=env)
    assert out.returncode == 2 and words[0] in out.stderr, out.stderr


def test_hashed_words_features():
    # element i counts the words whose zlib CRC-32 (UTF-8) modulo the width is i; lower-cased, split on \w+
    rows = hashed_words(["Hello, hello WORLD", ""], 8)
    assert rows.shape == (2, 8) and rows.dtype.name == "float32"
    # crc32(b"hello") = 907060870 (% 8 = 6), crc32(b"world") = 980881731 (% 8 = 3)
    assert rows[0].tolist() == [0, 0, 0, 1, 0, 0, 2, 0] and rows[1].sum() == 0
