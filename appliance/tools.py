"""Tool calls: the ``tools`` and ``tool_choice`` a request offers, the grammar a call is generated under, and
reading the calls back out of the answer.

A model can call tools when its GGUF's own chat template renders ``tools`` and writes calls in the Hermes/Qwen2.5
form, one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` block (:func:`template_supports`): that
is the form this module constrains and parses. Other models are refused with ``bad_request`` naming ``tools``.

The call is produced under a grammar built from each tool's ``parameters`` schema, checked first by
:func:`appliance.structured.check_schema` (a keyword the grammar cannot enforce is refused, naming it):

- ``required`` or a named function: the whole answer is exactly one call (of that function);
- ``auto``: the answer is either one call or plain text that does not start with ``<`` (the grammar's choice is
  made on the first character, so a text answer can never turn into a half-written call);
- ``none``: the tools are rendered into the prompt, no grammar is used and the answer is never read as a call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.errors import BadRequest, Truncated
from appliance.structured import check_schema

if TYPE_CHECKING:
    from appliance.protocol import Completion

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CHOICES = ("auto", "none", "required")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: ``arguments`` is compact JSON text of an object (OpenAI sends and expects a string)."""

    id: str
    name: str
    arguments: str

    def arguments_object(self) -> Any:
        return json.loads(self.arguments)

    def template_dict(self) -> dict[str, Any]:
        """The call as chat templates read it (Hugging Face's convention: arguments as an object)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_object()}}


@dataclass(frozen=True)
class Tool:
    name: str
    definition: str  # the tool object as the client sent it (JSON text), rendered by the chat template
    parameters: str  # the checked parameters schema (JSON text) the call's arguments are generated under


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how the model may use them (``choice``: auto, none, required, or function
    with ``function`` naming the one it must call)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    function: str | None = None

    @property
    def calls(self) -> bool:
        """Whether the answer may be a call (with "none" it is always text)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def definitions(self) -> list[dict[str, Any]]:
        return [json.loads(t.definition) for t in self.tools]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_supports(template: str | None) -> bool:
    """A chat template renders tools when its source uses the ``tools`` variable, and writes calls in the form
    this module parses when it holds the ``<tool_call>`` tag (Qwen2.5, Hermes, SmolLM3 ...)."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None and OPEN in (template or "")


def parse_tools(tools: object, choice: object) -> ToolUse | None:
    """Validate ``tools`` (OpenAI's and Ollama's shape: ``{"type": "function", "function": {name, description,
    parameters}}``) and ``tool_choice``; None when no tools are offered."""
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects",
                         param="tools")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        parsed.append(_tool(tool, f"tools[{i}]"))
    names = [t.name for t in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise BadRequest(f"'tools' names the function '{duplicate}' twice", param="tools")
    if choice is None or choice in CHOICES:
        return ToolUse(tuple(parsed), str(choice or "auto"))
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": "
                         "{\"name\": ...}}", param="tool_choice")
    if name not in names:
        raise BadRequest(f"'tool_choice' names '{name}', which is not among 'tools'", param="tool_choice")
    return ToolUse(tuple(parsed), "function", name)


def _tool(tool: object, where: str) -> Tool:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise BadRequest(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where)
    unknown = sorted(set(function) - _FUNCTION_KEYS)
    if unknown:
        raise BadRequest(f"unknown field '{where}.function.{unknown[0]}'", param=f"{where}.function.{unknown[0]}")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'",
                         param=f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"'{where}.function.description' must be a string", param=f"{where}.function.description")
    param = f"{where}.function.parameters"
    schema = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(schema, dict) or schema.get("type") != "object":
        # a call's arguments are always an object (OpenAI's rule), so the schema must describe one
        raise BadRequest(f"'{param}' must be a JSON schema with \"type\": \"object\"", param=param)
    if _has_ref(schema):
        # the schema is nested inside the call's grammar, where its local '#/...' references would point elsewhere
        raise BadRequest(f"'{param}' may not use '$ref' or '$defs' (write the schema out)", param=param)
    checked = check_schema(schema, param)
    return Tool(name, json.dumps(tool, ensure_ascii=False), json.dumps(checked, ensure_ascii=False))


def _has_ref(node: object) -> bool:
    if isinstance(node, dict):
        return any(k in ("$ref", "$defs", "definitions") for k in node) or any(_has_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_ref(v) for v in node)
    return False


def grammar(use: ToolUse, to_gbnf: Callable[[str], str]) -> str | None:
    """The GBNF grammar of the answer (None with "none"). ``to_gbnf`` is llama-cpp-python's JSON-schema converter,
    passed in because only the worker imports the engine."""
    if not use.calls:
        return None
    offered = [t for t in use.tools if use.function in (None, t.name)]
    shapes = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
               "required": ["name", "arguments"]} for t in offered]
    schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    # the converter's own start rule becomes one rule of ours (its sub-rules are named root-0, root-1 ...)
    call_json = re.sub(r"^root ::=", "tool-call-json ::=", to_gbnf(json.dumps(schema)), flags=re.MULTILINE)
    rules = [call_json.strip(), f'tool-call ::= "{OPEN}\\n" tool-call-json "\\n{CLOSE}"']
    if use.forced:
        rules.append("root ::= tool-call")
    else:
        # text must not open with "<", so the grammar decides between a call and text at the first character
        rules += ["root ::= tool-call | prose", "prose ::= [^<] [^\\x00]*"]
    return "\n".join(rules) + "\n"


def parse_calls(use: ToolUse | None, text: str) -> tuple[ToolCall, ...]:
    """The calls an answer makes: none unless calls were allowed and the answer is call blocks naming offered
    tools with object arguments. Only an answer that opens with ``<tool_call>`` at its very first character is read:
    the grammar constrains a call only there (after a first character that is not ``<``, text is free, and a
    "call" written later was never held to the tool's schema)."""
    if use is None or not use.calls or not text.startswith(OPEN):
        return ()
    names = {t.name for t in use.tools}
    calls = []
    for block in _BLOCK.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            return ()
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"),
                                                                                           dict):
            return ()
        calls.append(ToolCall(new_call_id(), call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
    return tuple(calls)


def check_complete(use: ToolUse, completion: Completion) -> None:
    """Raise :class:`Truncated` when a call was cut before it closed (max_tokens or a full context)."""
    if use.calls and completion.finish_reason == "length" and (use.forced or
                                                                completion.text.startswith(OPEN)):
        raise Truncated(f"the tool call was cut after {completion.usage.completion_tokens} tokens, before it was "
                        f"complete: raise max_tokens", param="max_tokens")


def message_calls(value: object, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls`` sent back by a client: OpenAI's (``id``, ``function.arguments`` as
    JSON text) or Ollama's (no id, ``function.arguments`` as an object)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest(f"'{where}' must be a list of tool calls", param=where)
    calls = []
    for i, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str):
            raise BadRequest(f"'{where}[{i}]' must be {{\"function\": {{\"name\", \"arguments\"}}}}",
                             param=f"{where}[{i}]")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise BadRequest(f"'{where}[{i}].function.arguments' is not JSON",
                                 param=f"{where}[{i}].function.arguments") from None
        if not isinstance(arguments, dict):
            raise BadRequest(f"'{where}[{i}].function.arguments' must be an object",
                             param=f"{where}[{i}].function.arguments")
        call_id = item.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) and call_id else new_call_id(), name,
                              json.dumps(arguments, ensure_ascii=False)))
    return tuple(calls)


class CallDetector:
    """Streams an answer that may be a call: text is held back while it could still be the start of
    ``<tool_call>``; once it cannot, it is released as content; a call is only sent whole, at the end."""

    def __init__(self, use: ToolUse | None) -> None:
        self.use = use
        self.state = "undecided" if use is not None and use.calls else "text"
        self.held = ""

    def push(self, piece: str) -> str:
        """The content to send now (may be empty)."""
        if self.state == "text":
            return piece
        self.held += piece
        if self.state == "call" or self.held.startswith(OPEN):
            self.state = "call"
            return ""
        if OPEN.startswith(self.held):
            return ""
        self.state, out, self.held = "text", self.held, ""
        return out

    def finish(self, text: str) -> tuple[tuple[ToolCall, ...], str]:
        """The calls of the whole answer, and the held-back text still to send as content when it is none."""
        calls = parse_calls(self.use, text) if self.state != "text" else ()
        rest, self.held = ("" if calls else self.held), ""
        return calls, rest
