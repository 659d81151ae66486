"""Prompt formats: turn chat messages into the text a model was trained on.

A GGUF that embeds ``tokenizer.chat_template`` is rendered with that Jinja template (by the backend, which owns the
file); every other model names one of the formats below in its catalog entry. Renderers return the prompt text
*without* the BOS token (the backend adds it the way the model's tokenizer asks) and the stop sequences that end an
assistant turn in that format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.protocol import Message


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...] = ()


Renderer = Callable[[Sequence[Message]], RenderedPrompt]
_RENDERERS: dict[str, Renderer] = {}


def template(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        _RENDERERS[name] = fn
        return fn
    return register


def names() -> list[str]:
    return sorted(_RENDERERS)


def render(name: str, messages: Sequence[Message]) -> RenderedPrompt:
    try:
        renderer = _RENDERERS[name]
    except KeyError:
        raise KeyError(f"unknown prompt template '{name}' (known: {', '.join(names())})") from None
    return renderer(messages)


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, list(messages[1:])
    return None, list(messages)


@template("chatml")
def _chatml(messages: Sequence[Message]) -> RenderedPrompt:
    # https://github.com/openai/openai-python/blob/release-v0.28.0/chatml.md
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return RenderedPrompt(text + "<|im_start|>assistant\n", ("<|im_end|>",))


@template("gemma")
def _gemma(messages: Sequence[Message]) -> RenderedPrompt:
    # Gemma has no system role: its published template folds the system text into the first user turn.
    # https://ai.google.dev/gemma/docs/core/prompt-structure
    system, turns = _split_system(messages)
    parts = []
    for i, m in enumerate(turns):
        role = "model" if m.role == "assistant" else "user"
        content = f"{system}\n\n{m.content}" if (i == 0 and system) else m.content
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if system and not turns:
        parts.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    return RenderedPrompt("".join(parts) + "<start_of_turn>model\n", ("<end_of_turn>",))


@template("alpaca")
def _alpaca(messages: Sequence[Message]) -> RenderedPrompt:
    # https://github.com/tatsu-lab/stanford_alpaca#data-release (prompt without input)
    system, turns = _split_system(messages)
    preamble = system or ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.")
    parts = [preamble + "\n\n"]
    for m in turns:
        if m.role == "user":
            parts.append(f"### Instruction:\n{m.content}\n\n")
        else:
            parts.append(f"### Response:\n{m.content}\n\n")
    return RenderedPrompt("".join(parts) + "### Response:\n", ("### Instruction:",))


@template("llama-2")
def _llama2(messages: Sequence[Message]) -> RenderedPrompt:
    # https://github.com/meta-llama/llama/blob/main/llama/generation.py (chat_completion)
    system, turns = _split_system(messages)
    text, first = "", True
    for m in turns:
        if m.role == "user":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m.content}" if (first and system) else m.content
            text += ("" if first else "<s>") + f"[INST] {content.strip()} [/INST]"
            first = False
        else:
            text += f" {m.content.strip()} </s>"
    return RenderedPrompt(text, ())


@template("plain")
def _plain(messages: Sequence[Message]) -> RenderedPrompt:
    # Base models with no chat format (Flan-T5, OPT, raw completion): the turns, one paragraph each.
    return RenderedPrompt("\n\n".join(m.content for m in messages), ())
