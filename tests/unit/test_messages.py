"""The messages between processes (appliance/messages.py) survive the pipe: pickled both ways, errors included."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from appliance import errors, messages
from appliance.backends.base import GenerationTask, ModelInfo
from appliance.protocol import Completion, SamplingParams, Usage
from tests.support.rig import fake_model

ERRORS = [cls for cls in vars(errors).values()
          if isinstance(cls, type) and issubclass(cls, errors.ApplianceError) and cls is not errors.ConfigError]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_an_error_crosses_the_pipe_whole(cls):
    error = cls("the reason", param="prompt")
    error.http_status = 418
    back = pickle.loads(pickle.dumps(messages.Failed(7, error))).error
    assert type(back) is cls
    assert (back.code, back.message, back.param, back.http_status, str(back)) == \
        (error.code, "the reason", "prompt", 418, "the reason")


def test_a_config_error_keeps_its_problems():
    back = pickle.loads(pickle.dumps(errors.ConfigError(["a: bad", "b: worse"])))
    assert back.problems == ["a: bad", "b: worse"] and "b: worse" in back.message


def test_every_message_pickles_and_is_frozen(tmp_path):
    entry = fake_model(tmp_path, "m")
    task = GenerationTask(prompt="p", messages=None, params=SamplingParams(max_tokens=3))
    completion = Completion("t", "stop", Usage(1, 1), 1.0, 2.0, "m")
    samples = [messages.Load(entry), messages.Unload(), messages.Generate(1, task), messages.Cancel(1),
               messages.Pause(), messages.Resume(), messages.Throttle(2, 0.05), messages.Shutdown(),
               messages.Infer(1, entry, {"x": [1.0]}), messages.Ready(42), messages.Loaded(ModelInfo("m", 64, "fake")),
               messages.Unloaded(), messages.LoadFailed("m", errors.ModelError("x"), "n"), messages.Progress(1, 2, 3),
               messages.Chunk(1, 1, "a"), messages.Done(1, completion), messages.Failed(1, errors.Busy("full")),
               messages.Stopped(1), messages.StepReport((messages.Progress(1, 2, 3), messages.Chunk(2, 1, "b"))),
               messages.Inferred(1, {"y": [0.5]}, 1.5), messages.Embed(1, entry, ("a text",), False),
               messages.Embedded(1, [[0.6, 0.8]], 3, 1.5), messages.Exited(-9), messages.Crashed(1, "exit code 3"),
               messages.Abandoned(1)]
    defined = {c for c in vars(messages).values() if dataclasses.is_dataclass(c) and c.__module__ == messages.__name__}
    assert {type(m) for m in samples} == defined
    for message in samples:
        back = pickle.loads(pickle.dumps(message))
        assert type(back) is type(message)
        if not isinstance(message, messages.Failed | messages.LoadFailed):  # exceptions compare by identity
            assert back == message
        for field in dataclasses.fields(message):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, field.name, None)
