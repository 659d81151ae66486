"""The moderation gate (appliance/generation/moderation.py) in front of the real Scheduler: a verdict releases the
job to the queue or refuses it, naming the field and the label, never the text. The classifier's answers are
scripted here (the ONNX worker itself is tested in tests/integration/test_moderation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.catalog.entry import OutputSpec, TensorSpec
from appliance.errors import Busy
from appliance.generation.moderation import Moderator
from appliance.messages import Done, Failed
from appliance.protocol import TensorResult, parse_generate
from tests.support.rig import Recorder, fake_model

WIDTH = 32


class ScriptedClassifier:
    """Stands in for the tensor pool: keeps each request until the test answers it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str | int | None, dict, object]] = []

    def enqueue(self, model_id, rid, arrays, reply, transport) -> None:
        assert transport is None  # the filter's own requests count in no metric
        self.asked.append((rid, arrays, reply))

    def answer(self, *rows: dict[str, float]) -> None:
        rid, _, reply = self.asked.pop(0)
        reply(TensorResult(rid, "filter", {"scores": {"values": [], "shape": [], "scores": list(rows)}}, 0.5))

    def fail(self, error) -> None:
        self.asked.pop(0)[2](error)


@pytest.fixture
def gated(rig, tmp_path):
    r = rig()
    entry = fake_model(tmp_path, "filter")
    from dataclasses import replace
    entry = replace(entry, backend="onnx", featurize="hashed-words",
                    inputs=(TensorSpec("features", "float32", (None, WIDTH)),),
                    outputs=(OutputSpec("scores", ("ok", "flagged")),))
    r.catalog._entries["filter"] = entry
    classifier = ScriptedClassifier()
    config = replace(r.config.moderation, model="filter", block="flagged", threshold=0.5)
    r.scheduler.gate = Moderator(config, r.catalog, classifier).check
    r.wait_state("ready")
    return r, classifier


def _submit(r, body):
    sink = Recorder()
    job = r.scheduler.submit(parse_generate({"stream": True, **body}), sink, "test")
    return job, sink


def test_text_that_passes_runs(gated):
    r, classifier = gated
    _, sink = _submit(r, {"prompt": "Hola", "id": "h"})
    assert sink.nothing_more(0.1)  # held until the classifier answers
    rid, arrays, _ = classifier.asked[0]
    assert rid == "h" and arrays["features"].shape == (1, WIDTH) and arrays["features"].dtype == np.float32
    classifier.answer({"ok": 0.9, "flagged": 0.1})
    assert isinstance(sink.final(), Done)


def test_flagged_text_is_refused_naming_the_message_and_the_label(gated):
    r, classifier = gated
    _, sink = _submit(r, {"messages": [{"role": "system", "content": "be kind"},
                                       {"role": "user", "content": "something awful"}]})
    classifier.answer({"ok": 0.9, "flagged": 0.1}, {"ok": 0.2, "flagged": 0.8})
    event = sink.final()
    assert isinstance(event, Failed) and event.error.code == "moderated" and event.error.param == "messages[1]"
    assert "'flagged' scored 0.80 (moderation.threshold = 0.5)" in event.error.message
    assert "awful" not in event.error.message
    assert r.counted("moderated") == 1 and r.scheduler.outstanding == 0


def test_a_classifier_that_cannot_answer_refuses_the_request(gated):
    r, classifier = gated
    _, sink = _submit(r, {"prompt": "x"})
    classifier.fail(Busy("the inference queue is full"))
    event = sink.final()
    assert event.error.code == "busy"
    assert event.error.message == "the moderation filter could not check this request: the inference queue is full"


def test_an_answer_without_a_score_per_text_is_a_model_error(gated):
    r, classifier = gated
    _, sink = _submit(r, {"prompt": "x"})
    classifier.answer()
    assert sink.final().error.code == "model_error"
