"""OpenAI request mapping: compatible values pass, unsupported ones are refused by name."""

from __future__ import annotations

import pytest

from appliance.errors import BadRequest
from appliance.protocol import Completion, Usage
from appliance.transports import openai


def test_completion_request_mapping():
    request = openai.completion_request({"model": "m", "prompt": ["hi"], "max_tokens": 5, "n": 1, "echo": False,
                                         "logprobs": None, "presence_penalty": 0, "user": "u", "top_k": 3,
                                         "stream": True, "stream_options": {"include_usage": True}})
    assert request.prompt == "hi" and request.model == "m" and request.params.top_k == 3 and request.stream
    assert str(request.id).startswith("cmpl-")


def test_chat_request_prefers_max_completion_tokens():
    request = openai.chat_request({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4,
                                   "response_format": {"type": "text"}})
    assert request.params.max_tokens == 4 and str(request.id).startswith("chatcmpl-")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "n": 3}, "n"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "a", "wat": 1}, "wat"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
])
def test_unsupported_values_are_refused_by_name(body, param):
    with pytest.raises(BadRequest) as err:
        openai.completion_request(body)
    assert err.value.param == param


def test_response_shapes():
    request = openai.chat_request({"messages": [{"role": "user", "content": "x"}]})
    shaper = openai.ResponseShaper(request, "m", "chat")
    completion = Completion("hello", "stop", Usage(3, 2), 12.5, 40.0, "m")
    full = shaper.full(completion)
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    finals = shaper.final_chunks(completion, include_usage=True)
    assert finals[0]["choices"][0]["finish_reason"] == "stop" and finals[1]["choices"] == []
    assert finals[1]["usage"]["total_tokens"] == 5
