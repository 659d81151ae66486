"""Prompt formats: turn chat messages into the text each model family was trained on.

A GGUF that embeds ``tokenizer.chat_template`` is rendered with that Jinja template (by the backend, which owns the
file) unless its catalog entry names a template; every other model uses one of the formats below, each following
its family's published source (cited per function; tests/unit/test_templates.py holds the golden strings).

Renderers return the prompt text *without* a leading BOS (the backend adds it when the tokenizer asks for it) and
the stop sequences that end an assistant turn. Special tokens inside a format (``</s>`` between Vicuna turns,
``<|endoftext|>`` in Open Assistant's) are written as text; the backend tokenizes with special tokens parsed.

Conventions where a source leaves something open (documented in docs/models.md):
- a system message replaces the family's fixed preamble when it has one (as FastChat does); formats with neither
  a system role nor a preamble put the system text first, on its own paragraph;
- single-turn formats (Alpaca, Dolly) repeat their instruction/response blocks for earlier turns;
- Alpaca's and Dolly's "input" is a second user message that directly follows the instruction.
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


def _exchanges(turns: list[Message]) -> list[tuple[str, str | None]]:
    """(user, assistant reply or None) pairs; consecutive messages of one role are joined by a blank line."""
    pairs: list[tuple[str, str | None]] = []
    for m in turns:
        if m.role == "user":
            if pairs and pairs[-1][1] is None:
                pairs[-1] = (pairs[-1][0] + "\n\n" + m.content, None)
            else:
                pairs.append((m.content, None))
        elif pairs:
            user, reply = pairs[-1]
            pairs[-1] = (user, m.content if reply is None else reply + "\n\n" + m.content)
        else:
            pairs.append(("", m.content))
    return pairs


def _by_exchange(messages: Sequence[Message], *, system: str, user: str, answer: str, stop: tuple[str, ...] = (),
                 head: str = "", clean: Callable[[str], str] = str) -> RenderedPrompt:
    """The shape most formats share: ``head``, the system block when there is a system message, then each
    exchange's user turn and, once given, its answer. ``system``, ``user`` and ``answer`` are format strings of
    ``{text}`` (the user turn may also use ``{round}``, counting exchanges from 1); ``clean`` tidies every text."""
    system_text, turns = _split_system(messages)
    text = head + (system.format(text=clean(system_text)) if system_text else "")
    for i, (u, a) in enumerate(_exchanges(turns), start=1):
        text += user.format(text=clean(u), round=i) + (answer.format(text=clean(a)) if a is not None else "")
    return RenderedPrompt(text, stop)


def _one_paragraph(text: str) -> str:
    """A message as one paragraph: a blank line inside it would end the turn (ChatRWKV's README; Falcon)."""
    return text.strip().replace("\r\n", "\n").replace("\n\n", "\n")


def _colon_two(preamble: str, user: str, bot: str, turns: list[Message], sep: str = " ",
               sep2: str = "</s>") -> str:
    """FastChat's ADD_COLON_TWO: ``preamble sep USER: u sep BOT: a sep2 ... BOT:``."""
    text = preamble + sep
    for u, a in _exchanges(turns):
        text += f"{user}: {u}{sep}"
        if a is None:
            return text + f"{bot}:"
        text += f"{bot}: {a}{sep2}"
    return text + f"{bot}:"


# -- instruction formats -------------------------------------------------------------------------------------------

INSTRUCTION_PREAMBLE = ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request.")
INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")


def _instruction_blocks(messages: Sequence[Message], *, response_tail: str, input_key: str,
                        input_preamble: bool, answer_end: str = "") -> str:
    """Instruction/response blocks after a preamble; earlier turns repeat the blocks, answered."""
    system, turns = _split_system(messages)
    given_input = None
    if len(turns) >= 2 and turns[-1].role == turns[-2].role == "user":
        given_input = turns.pop().content
    text = system or (INPUT_PREAMBLE if given_input is not None and input_preamble else INSTRUCTION_PREAMBLE)
    pairs = _exchanges(turns) or [("", None)]
    for u, a in pairs[:-1]:
        text += f"\n\n### Instruction:\n{u}\n\n### Response:\n{a}{answer_end}"
    question, prefill = pairs[-1]
    text += f"\n\n### Instruction:\n{question}"
    if given_input is not None:
        text += f"\n\n{input_key}\n{given_input}"
    return text + "\n\n" + response_tail + (prefill or "")


@template("alpaca")
def _alpaca(messages: Sequence[Message]) -> RenderedPrompt:
    # tatsu-lab/stanford_alpaca train.py PROMPT_DICT: the prompt ends in "### Response:" with no newline
    return RenderedPrompt(_instruction_blocks(messages, response_tail="### Response:", input_key="### Input:",
                                              input_preamble=True), ("### Instruction:",))


@template("alpaca-lora")
def _alpaca_lora(messages: Sequence[Message]) -> RenderedPrompt:
    # tloen/alpaca-lora templates/alpaca.json: as Stanford's, but "### Response:\n"
    return RenderedPrompt(_instruction_blocks(messages, response_tail="### Response:\n", input_key="### Input:",
                                              input_preamble=True), ("### Instruction:",))


@template("dolly")
def _dolly(messages: Sequence[Message]) -> RenderedPrompt:
    # databrickslabs/dolly training/consts.py: same blurb; "Input:" (no ###); each answer ends in "### End"
    return RenderedPrompt(_instruction_blocks(messages, response_tail="### Response:\n", input_key="Input:",
                                              input_preamble=False, answer_end="### End"), ("### End",))


@template("gpt4all")
def _gpt4all(messages: Sequence[Message]) -> RenderedPrompt:
    # nomic-ai/gpt4all gpt4all-chat/metadata/models3.json (GPT4All 3.x chat template of the Snoozy entry);
    # stops: gpt4all-backend/llmodel_shared.cpp reversePrompts
    system, turns = _split_system(messages)
    text = f"{system}\n\n" if system else ""
    for u, a in _exchanges(turns):
        text += f"### Instruction:\n{u}\n\n### Response:\n"
        if a is not None:
            text += f"{a}\n\n"
    return RenderedPrompt(text, ("### Instruction", "### Prompt", "### Response", "### Human", "### Assistant",
                                 "### Context"))


# -- chat formats --------------------------------------------------------------------------------------------------

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
BAIZE_SYSTEM = ("The following is a conversation between a human and an AI assistant named Baize (named after a "
                "mythical creature in Chinese folklore). Baize is an open-source AI assistant developed by UCSD and "
                "Sun Yat-Sen University. The human and the AI assistant take turns chatting. Human statements start "
                "with [|Human|] and AI assistant statements start with [|AI|]. The AI assistant always provides "
                "responses in as much detail as possible, and in Markdown format. The AI assistant always declines "
                "to engage with topics, questions and instructions related to unethical, controversial, or sensitive "
                "issues. Complete the transcript in exactly that format.\n")
COATI_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.\n\n")


@template("vicuna")
def _vicuna(messages: Sequence[Message]) -> RenderedPrompt:
    # lm-sys/FastChat fastchat/conversation.py, "vicuna_v1.1"
    system, turns = _split_system(messages)
    return RenderedPrompt(_colon_two(system or VICUNA_SYSTEM, "USER", "ASSISTANT", turns), ("</s>",))


@template("koala")
def _koala(messages: Sequence[Message]) -> RenderedPrompt:
    # young-geng/EasyLM docs/koala.md serving flags; FastChat "koala_v1" for several turns
    system, turns = _split_system(messages)
    return RenderedPrompt(_colon_two(system or "BEGINNING OF CONVERSATION:", "USER", "GPT", turns), ("</s>",))


@template("baize")
def _baize(messages: Sequence[Message]) -> RenderedPrompt:
    # project-baize/baize-chatbot demo/app_modules/utils.py: preamble with a one-shot exchange, then the history
    system, turns = _split_system(messages)
    text = (system or BAIZE_SYSTEM) + "[|Human|]Hello!\n[|AI|]Hi!"
    for u, a in _exchanges(turns):
        text += f"\n[|Human|]{u}\n[|AI|]" + (a if a is not None else "")
    return RenderedPrompt(text, ("[|Human|]", "[|AI|]"))


@template("colossalchat")
def _colossalchat(messages: Sequence[Message]) -> RenderedPrompt:
    # hpcaitech/ColossalAI applications/Chat/coati/dataset/conversation.py (the Coati template ColossalChat serves)
    system, turns = _split_system(messages)
    text = system if system is not None else COATI_SYSTEM
    for u, a in _exchanges(turns):
        text += f"Human: {u}</s>Assistant: "
        if a is not None:
            text += f"{a}</s>"
    return RenderedPrompt(text, ("</s>",))


@template("openchatkit")
def _openchatkit(messages: Sequence[Message]) -> RenderedPrompt:
    # togethercomputer/OpenChatKit inference/conversation.py: "<human>: q\n<bot>:"
    return _by_exchange(messages, system="{text}\n\n", user="<human>: {text}\n<bot>:", answer=" {text}\n",
                        stop=("<human>:",))


@template("oasst")
def _oasst(messages: Sequence[Message]) -> RenderedPrompt:
    # LAION-AI/Open-Assistant model/model_training/custom_datasets/formatting.py (QA_SPECIAL_TOKENS)
    return _by_exchange(messages, system="<|system|>{text}<|endoftext|>",
                        user="<|prompter|>{text}<|endoftext|><|assistant|>", answer="{text}<|endoftext|>",
                        stop=("<|endoftext|>",))


def _rwkv(messages: Sequence[Message], user: str, bot: str) -> RenderedPrompt:
    # ChatRWKV README: "avoid \n\n" inside a message: it ends a turn
    return _by_exchange(messages, system="{text}\n\n", user=f"{user}: {{text}}\n\n{bot}:", answer=" {text}\n\n",
                        stop=("\n\n",), clean=_one_paragraph)


@template("raven")
def _raven(messages: Sequence[Message]) -> RenderedPrompt:
    # BlinkDL/ChatRWKV README.md: "Bob: xxx\n\nAlice: xxx\n\nBob: xxx\n\nAlice:", no space after the last colon
    return _rwkv(messages, "Bob", "Alice")


@template("rwkv-world")
def _rwkv_world(messages: Sequence[Message]) -> RenderedPrompt:
    # BlinkDL/ChatRWKV API_DEMO_CHAT.py: "User: msg\n\nAssistant:"
    return _rwkv(messages, "User", "Assistant")


@template("chatglm")
def _chatglm(messages: Sequence[Message]) -> RenderedPrompt:
    # THUDM/ChatGLM-6B ptuning/main.py: a lone query as is; with history "[Round i]\n问：q\n答：a\n"
    system, turns = _split_system(messages)
    pairs = _exchanges(turns)
    if system:
        pairs[0] = (f"{system}\n{pairs[0][0]}" if pairs else system, pairs[0][1] if pairs else None)
    if len(pairs) == 1 and pairs[0][1] is None:
        return RenderedPrompt(pairs[0][0])
    text = ""
    for i, (u, a) in enumerate(pairs):
        text += f"[Round {i}]\n问：{u}\n答：" + (f"{a}\n" if a is not None else "")
    return RenderedPrompt(text)


@template("chatglm2")
def _chatglm2(messages: Sequence[Message]) -> RenderedPrompt:
    # THUDM/chatglm2-6b tokenization_chatglm.py build_prompt (read from a verbatim copy)
    return _by_exchange(messages, system="{text}\n\n", user="[Round {round}]\n\n问：{text}\n\n答：",
                        answer="{text}\n\n")


@template("chatglm3")
def _chatglm3(messages: Sequence[Message]) -> RenderedPrompt:
    # THUDM/chatglm3-6b tokenizer_config.json chat_template (the role markers are special tokens)
    text = "[gMASK]sop" + "".join(f"<|{m.role}|>\n {m.content}" for m in messages) + "<|assistant|>"
    return RenderedPrompt(text, ("<|user|>", "<|observation|>"))


@template("llama-2")
def _llama2(messages: Sequence[Message]) -> RenderedPrompt:
    # meta-llama/llama llama/generation.py chat_completion (the first <s> is the tokenizer's BOS)
    system, turns = _split_system(messages)
    text, first = "", True
    for u, a in _exchanges(turns):
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u.strip()}" if (first and system) else u.strip()
        text += ("" if first else "<s>") + f"[INST] {content} [/INST]"
        first = False
        if a is not None:
            text += f" {a.strip()} </s>"
    return RenderedPrompt(text, ())


@template("mistral")
def _mistral(messages: Sequence[Message]) -> RenderedPrompt:
    # mistralai/Mistral-7B-Instruct-v0.1 model card and tokenizer_config chat template; a system message is
    # folded into the first user turn with a blank line (mistral-common's convention)
    system, turns = _split_system(messages)
    text = ""
    for i, (u, a) in enumerate(_exchanges(turns)):
        content = f"{system}\n\n{u}" if (i == 0 and system) else u
        text += f"[INST] {content} [/INST]" + (f"{a}</s> " if a is not None else "")
    return RenderedPrompt(text, ())


@template("falcon")
def _falcon(messages: Sequence[Message]) -> RenderedPrompt:
    # tiiuae/falcon-7b-instruct tokenizer_config.json chat template (PR #111); FastChat's stop "\nUser"
    system, turns = _split_system(messages)
    text = (system or "").strip()
    for u, a in _exchanges(turns):
        text += f"\n\nUser: {_one_paragraph(u)}\n\nAssistant:" + (f" {_one_paragraph(a)}" if a is not None else "")
    return RenderedPrompt(text, ("\nUser",))


@template("olmo")
def _olmo(messages: Sequence[Message]) -> RenderedPrompt:
    # allenai/OLMo-7B-Instruct tokenizer_config.json chat template (Tulu); a system turn as OLMo-2 renders it
    return _by_exchange(messages, head="<|endoftext|>", system="<|system|>\n{text}\n",
                        user="<|user|>\n{text}\n<|assistant|>\n", answer="{text}<|endoftext|>\n",
                        stop=("<|endoftext|>",))


@template("chatyuan")
def _chatyuan(messages: Sequence[Message]) -> RenderedPrompt:
    # clue-ai/ChatYuan README.md / app_gradio.py: "用户：q\n小元：", newlines escaped as "\\n" before tokenizing
    system, turns = _split_system(messages)
    lines = [system] if system else []
    for u, a in _exchanges(turns):
        lines.append(f"用户：{u}\n小元：" + (a if a is not None else ""))
    return RenderedPrompt("\n".join(lines).replace("\n", "\\n").replace("\t", "\\t"))


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


@template("plain")
def _plain(messages: Sequence[Message]) -> RenderedPrompt:
    # Base models with no chat format (Flan-T5, OPT, raw completion): the turns, one paragraph each.
    return RenderedPrompt("\n\n".join(m.content for m in messages), ())

