"""The fake engine plays its scripts (appliance/backends/fake.py): what the unit tier's scheduler tests rely on."""

from __future__ import annotations

import json
import threading
import time

import pytest

from appliance import backends
from appliance.backends.base import EngineSettings, GenerationTask, Piece, PromptProgress
from appliance.backends.fake import FakeBackend, script
from appliance.errors import ModelError, TooLong, UnsupportedArchitecture
from appliance.protocol import Completion, SamplingParams
from tests.support.rig import config_with, fake_model

SETTINGS = EngineSettings(threads=4, context_size=64, batch_size=8)


def _play(backend: FakeBackend, prompt: str, max_tokens: int = 100, should_stop=lambda: False) -> list:
    task = GenerationTask(prompt=prompt, messages=None, params=SamplingParams(max_tokens=max_tokens))
    return list(backend.generate(task, should_stop))


@pytest.fixture
def fake(tmp_path):
    backend = backends.create("fake", SETTINGS)
    backend.load(fake_model(tmp_path, "m"))
    yield backend
    backend.close()


def test_it_is_registered_like_the_real_engines(tmp_path):
    entry = fake_model(tmp_path, "m", footprint_mib=10)
    assert isinstance(backends.create("fake", SETTINGS), FakeBackend)
    assert backends.generates_text("fake")
    footprint = backends.probe_for("fake").footprint(entry, SETTINGS, margin=0)
    assert footprint is not None and footprint.total == 10 << 20


def test_a_script_plays_in_order_and_ends_with_a_completion(fake):
    events = _play(fake, script(["prompt", 1, 2], ["piece", "a"], ["pieces", 2], ["threads"]))
    assert events[0] == PromptProgress(1, 2)
    assert [e.text for e in events if isinstance(e, Piece)] == ["a", "t1 ", "t2 ", "threads=4"]
    done = events[-1]
    assert isinstance(done, Completion) and done.text == "at1 t2 threads=4" and done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4, 4)


def test_max_tokens_ends_it_with_length(fake):
    done = _play(fake, script(["pieces", 10]), max_tokens=3)[-1]
    assert (done.text, done.finish_reason) == ("t1 t2 t3 ", "length")


def test_plain_text_is_one_piece(fake):
    assert _play(fake, "hello there")[-1].text == "hello there"


def test_a_sleep_notices_should_stop_and_ends_without_a_completion(fake):
    started = time.monotonic()
    deadline = started + 0.1
    events = _play(fake, script(["piece", "a"], ["sleep", 5], ["piece", "b"]),
                   should_stop=lambda: time.monotonic() > deadline)
    assert time.monotonic() - started < 2
    assert events == [Piece("a")]


def test_wait_for_plays_on_once_its_file_exists_and_notices_should_stop_meanwhile(fake, tmp_path):
    gate = tmp_path / "go"
    threading.Timer(0.2, gate.touch).start()
    started = time.monotonic()
    assert [e.text for e in _play(fake, script(["wait_for", str(gate)], ["piece", "a"]))[:-1]] == ["a"]
    assert time.monotonic() - started >= 0.2
    deadline = time.monotonic() + 0.1
    events = _play(fake, script(["piece", "a"], ["wait_for", str(tmp_path / "never")], ["piece", "b"]),
                   should_stop=lambda: time.monotonic() > deadline)
    assert events == [Piece("a")]


def test_fail_raises_the_error_of_its_code(fake):
    with pytest.raises(TooLong, match="too many"):
        _play(fake, script(["fail", "too_long", "too many"]))


def test_exit_is_a_process_exit(fake):
    with pytest.raises(SystemExit) as caught:
        _play(fake, script(["exit", 3]))
    assert caught.value.code == 3


def test_load_failures_and_the_probe(tmp_path):
    with pytest.raises(ModelError, match="bad file"):
        FakeBackend(SETTINGS).load(fake_model(tmp_path, "bad", load_error=["model_error", "bad file"]))
    with pytest.raises(UnsupportedArchitecture, match="'opt'"):
        backends.probe_for("fake").check(fake_model(tmp_path, "opt", architecture="opt"))
    junk = fake_model(tmp_path, "junk")
    junk.path.write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ModelError, match="not a fake model|JSON object"):
        backends.probe_for("fake").check(junk)


def test_config_with_changes_only_the_keys_named():
    config = config_with(worker={"max_queue": 1})
    assert config.worker.max_queue == 1 and config.worker.context_size == 2048
