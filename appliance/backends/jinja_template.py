"""A GGUF's own chat template (Jinja), rendered as llama-cpp-python's ``Jinja2ChatFormatter`` renders it.

That class lives in ``llama_cpp.llama_chat_format``, which imports ``Llama`` and numpy; the batched worker runs
without them (llama_lib.py), so the few lines that matter are here, the same environment, filters and variables
(which themselves follow Hugging Face Transformers' chat-template rendering). tests/integration/test_llama_lean.py
renders the same conversations both ways and compares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for Hugging Face's ``{% generation %}`` tag."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(form: str) -> str:
    return datetime.now().strftime(form)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True)
class Rendered:
    prompt: str
    stop: tuple[str, ...]  # the EOS token's text: where create_chat_completion stops as well


class ChatTemplate:
    def __init__(self, template: str, *, eos_token: str, bos_token: str) -> None:
        self.template = template
        self._eos, self._bos = eos_token, bos_token
        environment = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        self._compiled = environment.from_string(template)

    def __call__(self, *, messages: list[Any], tools: list[Any] | None = None) -> Rendered:
        """The prompt for these messages, ending where the assistant's answer starts."""
        prompt = self._compiled.render(messages=messages, eos_token=self._eos, bos_token=self._bos,
                                       raise_exception=_raise_exception, add_generation_prompt=True, functions=None,
                                       function_call=None, tools=tools, tool_choice=None,
                                       strftime_now=_strftime_now)
        return Rendered(prompt, (self._eos,))
