"""Named prompt formats (the full family matrix with cited goldens comes with the models issue)."""

from __future__ import annotations

import pytest

from appliance import templates
from appliance.protocol import Message


def test_gemma_folds_the_system_prompt_into_the_first_user_turn():
    # https://ai.google.dev/gemma/docs/core/prompt-structure
    rendered = templates.render("gemma", [Message("system", "Be brief."), Message("user", "Hi"),
                                          Message("assistant", "Hello"), Message("user", "Bye")])
    assert rendered.text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello"
                             "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert rendered.stop == ("<end_of_turn>",)


def test_chatml():
    rendered = templates.render("chatml", [Message("user", "Hi")])
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_alpaca_without_input():
    # https://github.com/tatsu-lab/stanford_alpaca#data-release
    rendered = templates.render("alpaca", [Message("user", "List three colours.")])
    assert rendered.text == ("Below is an instruction that describes a task. Write a response that appropriately "
                             "completes the request.\n\n### Instruction:\nList three colours.\n\n### Response:\n")


def test_unknown_template():
    with pytest.raises(KeyError, match="known: "):
        templates.render("nope", [])
