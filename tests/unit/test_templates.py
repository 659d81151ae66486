"""Every family's prompt format against golden strings from its own published source.

Cases: A = user "Hello"; B = system "You are brief." + user "Hello"; C = user "Hi", assistant "Hello!",
user "How are you?". The expected strings were produced by running each source's own code or Jinja template on
these messages (the leading BOS the tokenizer adds is not part of the text). Where a source defines no system role
or no second turn, the appliance's documented convention is tested and marked so.
"""

from __future__ import annotations

import pytest

from appliance.backends import templates
from appliance.catalog import families
from appliance.protocol import Message

A = [Message("user", "Hello")]
B = [Message("system", "You are brief."), Message("user", "Hello")]
C = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "How are you?")]
VICUNA = templates.VICUNA_SYSTEM
BAIZE = templates.BAIZE_SYSTEM
PREAMBLE = templates.INSTRUCTION_PREAMBLE
COATI = templates.COATI_SYSTEM

GOLDEN = [
    # tatsu-lab/stanford_alpaca train.py @ c8ea92b PROMPT_DICT["prompt_no_input"]
    ("alpaca", A, PREAMBLE + "\n\n### Instruction:\nHello\n\n### Response:"),
    # tloen/alpaca-lora templates/alpaca.json @ 8d58d37 "prompt_no_input"
    ("alpaca-lora", A, PREAMBLE + "\n\n### Instruction:\nHello\n\n### Response:\n"),
    # lm-sys/FastChat fastchat/conversation.py @ 2e7855b "vicuna_v1.1" (ADD_COLON_TWO, sep " ", sep2 "</s>")
    ("vicuna", A, VICUNA + " USER: Hello ASSISTANT:"),
    ("vicuna", B, "You are brief. USER: Hello ASSISTANT:"),  # FastChat set_system_message replaces the default
    ("vicuna", C, VICUNA + " USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:"),
    # young-geng/EasyLM docs/koala.md + serving.py @ c73c8d9; several turns: FastChat "koala_v1"
    ("koala", A, "BEGINNING OF CONVERSATION: USER: Hello GPT:"),
    ("koala", C, "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>USER: How are you? GPT:"),
    # project-baize/baize-chatbot demo/app_modules/utils.py @ b53f62d (preamble + one-shot exchange)
    ("baize", A, BAIZE + "[|Human|]Hello!\n[|AI|]Hi!\n[|Human|]Hello\n[|AI|]"),
    ("baize", C, BAIZE + "[|Human|]Hello!\n[|AI|]Hi!\n[|Human|]Hi\n[|AI|]Hello!\n[|Human|]How are you?\n[|AI|]"),
    # hpcaitech/ColossalAI applications/Chat/coati/dataset/conversation.py @ 47932be (Coati template)
    ("colossalchat", A, COATI + "Human: Hello</s>Assistant: "),
    ("colossalchat", B, "You are brief.Human: Hello</s>Assistant: "),
    ("colossalchat", C, COATI + "Human: Hi</s>Assistant: Hello!</s>Human: How are you?</s>Assistant: "),
    # nomic-ai/gpt4all gpt4all-chat/metadata/models3.json @ 5cd0bd1 (Snoozy chat template)
    ("gpt4all", A, "### Instruction:\nHello\n\n### Response:\n"),
    ("gpt4all", B, "You are brief.\n\n### Instruction:\nHello\n\n### Response:\n"),
    ("gpt4all", C, "### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nHow are you?\n\n"
                   "### Response:\n"),
    # BlinkDL/ChatRWKV README.md @ ab836b4 (Raven: Bob/Alice) and API_DEMO_CHAT.py @ 3ae18bb (World: User/Assistant)
    ("raven", A, "Bob: Hello\n\nAlice:"),
    ("raven", C, "Bob: Hi\n\nAlice: Hello!\n\nBob: How are you?\n\nAlice:"),
    ("rwkv-world", A, "User: Hello\n\nAssistant:"),
    ("rwkv-world", C, "User: Hi\n\nAssistant: Hello!\n\nUser: How are you?\n\nAssistant:"),
    # togethercomputer/OpenChatKit inference/conversation.py @ 6fe02c8
    ("openchatkit", A, "<human>: Hello\n<bot>:"),
    ("openchatkit", C, "<human>: Hi\n<bot>: Hello!\n<human>: How are you?\n<bot>:"),
    # databrickslabs/dolly training/consts.py @ 905e58a; several turns: FastChat "dolly_v2"
    ("dolly", A, PREAMBLE + "\n\n### Instruction:\nHello\n\n### Response:\n"),
    ("dolly", C, PREAMBLE + "\n\n### Instruction:\nHi\n\n### Response:\nHello!### End\n\n### Instruction:\n"
                            "How are you?\n\n### Response:\n"),
    # LAION-AI/Open-Assistant model/model_training/custom_datasets/formatting.py @ 095ec41
    ("oasst", A, "<|prompter|>Hello<|endoftext|><|assistant|>"),
    ("oasst", B, "<|system|>You are brief.<|endoftext|><|prompter|>Hello<|endoftext|><|assistant|>"),
    ("oasst", C, "<|prompter|>Hi<|endoftext|><|assistant|>Hello!<|endoftext|><|prompter|>How are you?"
                 "<|endoftext|><|assistant|>"),
    # THUDM/ChatGLM-6B ptuning/main.py @ 90f2e47: a lone query as is; history as [Round i]
    ("chatglm", A, "Hello"),
    ("chatglm", C, "[Round 0]\n问：Hi\n答：Hello!\n[Round 1]\n问：How are you?\n答："),
    # THUDM/chatglm2-6b tokenization_chatglm.py build_prompt (secondary: a verbatim copy)
    ("chatglm2", A, "[Round 1]\n\n问：Hello\n\n答："),
    ("chatglm2", C, "[Round 1]\n\n问：Hi\n\n答：Hello!\n\n[Round 2]\n\n问：How are you?\n\n答："),
    # THUDM/chatglm3-6b tokenizer_config.json chat template (secondary: copies of it)
    ("chatglm3", A, "[gMASK]sop<|user|>\n Hello<|assistant|>"),
    ("chatglm3", B, "[gMASK]sop<|system|>\n You are brief.<|user|>\n Hello<|assistant|>"),
    ("chatglm3", C, "[gMASK]sop<|user|>\n Hi<|assistant|>\n Hello!<|user|>\n How are you?<|assistant|>"),
    # meta-llama/llama llama/generation.py @ c769dfd chat_completion (the first <s> is the tokenizer's BOS)
    ("llama-2", A, "[INST] Hello [/INST]"),
    ("llama-2", B, "[INST] <<SYS>>\nYou are brief.\n<</SYS>>\n\nHello [/INST]"),
    ("llama-2", C, "[INST] Hi [/INST] Hello! </s><s>[INST] How are you? [/INST]"),
    # Mistral-7B-Instruct-v0.1 model card and tokenizer_config chat template (first <s> from the tokenizer)
    ("mistral", A, "[INST] Hello [/INST]"),
    ("mistral", B, "[INST] You are brief.\n\nHello [/INST]"),  # mistral-common: system folded into turn one
    ("mistral", C, "[INST] Hi [/INST]Hello!</s> [INST] How are you? [/INST]"),
    # tiiuae/falcon-7b-instruct tokenizer_config.json chat template (PR #111)
    ("falcon", A, "\n\nUser: Hello\n\nAssistant:"),
    ("falcon", B, "You are brief.\n\nUser: Hello\n\nAssistant:"),
    ("falcon", C, "\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: How are you?\n\nAssistant:"),
    # allenai/OLMo-7B-Instruct tokenizer_config.json @ f09de2d; system turn as OLMo-2 renders it (secondary)
    ("olmo", A, "<|endoftext|><|user|>\nHello\n<|assistant|>\n"),
    ("olmo", B, "<|endoftext|><|system|>\nYou are brief.\n<|user|>\nHello\n<|assistant|>\n"),
    ("olmo", C, "<|endoftext|><|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n<|user|>\nHow are you?\n"
                "<|assistant|>\n"),
    # clue-ai/ChatYuan README.md @ d14eb43 + app_gradio.py @ 47d1ab3 (newlines escaped by preprocess())
    ("chatyuan", A, "用户：Hello\\n小元："),
    ("chatyuan", C, "用户：Hi\\n小元：Hello!\\n用户：How are you?\\n小元："),
    # openai/openai-python chatml.md @ release-v0.28.0
    ("chatml", B, "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                  "<|im_start|>assistant\n"),
    # https://ai.google.dev/gemma/docs/core/prompt-structure
    ("gemma", B, "<start_of_turn>user\nYou are brief.\n\nHello<end_of_turn>\n<start_of_turn>model\n"),
    # Flan-T5 / OPT: no chat format
    ("plain", A, "Hello"),
]

# A system message where the family has a fixed preamble: it takes the preamble's place, with the preamble's own
# separators (FastChat's convention: its templates keep the preamble in `system`, which a system message replaces).
SYSTEM_REPLACES_PREAMBLE = [
    # stanford_alpaca train.py @ c8ea92b PROMPT_DICT["prompt_no_input"], the system text in the preamble's place
    ("alpaca", B, "You are brief.\n\n### Instruction:\nHello\n\n### Response:"),
    # alpaca-lora templates/alpaca.json @ 8d58d37 "prompt_no_input", likewise
    ("alpaca-lora", B, "You are brief.\n\n### Instruction:\nHello\n\n### Response:\n"),
    # FastChat conversation.py @ 2e7855b "koala_v1": system "BEGINNING OF CONVERSATION:" replaced
    ("koala", B, "You are brief. USER: Hello GPT:"),
    # FastChat conversation.py @ 2e7855b "baize" (NO_COLON_SINGLE, sep "\n", the one-shot Hello!/Hi! kept): the
    # default system text ends in "\n", a replacement is written as given, so "[|Human|]" follows it directly
    ("baize", B, "You are brief.[|Human|]Hello!\n[|AI|]Hi!\n[|Human|]Hello\n[|AI|]"),
    # databrickslabs/dolly training/consts.py @ 905e58a PROMPT_FOR_GENERATION_FORMAT, the system text in {intro}
    ("dolly", B, "You are brief.\n\n### Instruction:\nHello\n\n### Response:\n"),
]

# Formats with no system role and no preamble: the system text comes first, as its own paragraph (the appliance's
# convention, docs/models.md), except where noted.
SYSTEM_FIRST = [
    # BlinkDL/ChatRWKV v2/chat.py @ 0871fa6: the init prompt is a paragraph followed by a blank line, then
    # "Bob: ...\n\nAlice:" (chat.py starts it with one more "\n", which is dropped here)
    ("raven", B, "You are brief.\n\nBob: Hello\n\nAlice:"),
    # BlinkDL/ChatRWKV API_DEMO_CHAT.py @ 3ae18bb turns, after the system paragraph as for Raven
    ("rwkv-world", B, "You are brief.\n\nUser: Hello\n\nAssistant:"),
    # togethercomputer/OpenChatKit inference/conversation.py @ 6fe02c8 turns (no system role there): convention
    ("openchatkit", B, "You are brief.\n\n<human>: Hello\n<bot>:"),
    # THUDM/ChatGLM-6B ptuning/main.py @ 90f2e47 lone query (no system role there): the system text on the line
    # before it, inside the query (convention)
    ("chatglm", B, "You are brief.\nHello"),
    # THUDM/chatglm2-6b build_prompt has no system role: the system paragraph before "[Round 1]" (convention)
    ("chatglm2", B, "You are brief.\n\n[Round 1]\n\n问：Hello\n\n答："),
    # clue-ai/ChatYuan README.md has no system role: the system text on the line before "用户：" (convention), its
    # newline escaped like every other by preprocess()
    ("chatyuan", B, "You are brief.\\n用户：Hello\\n小元："),
    # no format at all: one paragraph per message (convention)
    ("plain", B, "You are brief.\n\nHello"),
]

MULTI_TURN = [
    # stanford_alpaca is single-turn: earlier turns repeat its instruction/response blocks, answered (convention)
    ("alpaca", C, PREAMBLE + "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nHow are you?"
                            "\n\n### Response:"),
    # alpaca-lora templates/alpaca.json, the same convention ("### Response:\n" before each answer)
    ("alpaca-lora", C, PREAMBLE + "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n"
                                 "How are you?\n\n### Response:\n"),
    # openai/openai-python chatml.md @ release-v0.28.0: every message in its own im_start/im_end block
    ("chatml", C, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
                  "How are you?<|im_end|>\n<|im_start|>assistant\n"),
    # https://ai.google.dev/gemma/docs/core/prompt-structure (its multi-turn example: the assistant is "model")
    ("gemma", C, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                 "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"),
    ("plain", C, "Hi\n\nHello!\n\nHow are you?"),
    # the lone user turn of the same two sources
    ("chatml", A, "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ("gemma", A, "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"),
]


CASES = GOLDEN + SYSTEM_REPLACES_PREAMBLE + SYSTEM_FIRST + MULTI_TURN


@pytest.mark.parametrize("name, messages, expected", CASES,
                         ids=[f"{n}-{'ABC'[[A, B, C].index(m)]}" for n, m, _ in CASES])
def test_golden(name, messages, expected):
    assert templates.render(name, messages).text == expected


def test_every_template_has_a_single_turn_a_system_and_a_multi_turn_case():
    for name in templates.names():
        shapes = {"ABC"[[A, B, C].index(m)] for n, m, _ in CASES if n == name}
        assert shapes == {"A", "B", "C"}, (name, sorted(shapes))


def test_instruction_formats_with_input():
    """The second of two user messages in a row is the Alpaca/Dolly "input"."""
    with_input = [Message("user", "Hello"), Message("user", "World")]
    # stanford_alpaca train.py PROMPT_DICT["prompt_input"]
    assert templates.render("alpaca", with_input).text == (
        templates.INPUT_PREAMBLE + "\n\n### Instruction:\nHello\n\n### Input:\nWorld\n\n### Response:")
    # alpaca-lora templates/alpaca.json "prompt_input"
    assert templates.render("alpaca-lora", with_input).text.endswith("### Input:\nWorld\n\n### Response:\n")
    # dolly training/consts.py PROMPT_WITH_INPUT_FORMAT: the same blurb, "Input:" without ###
    assert templates.render("dolly", with_input).text == (
        PREAMBLE + "\n\n### Instruction:\nHello\n\nInput:\nWorld\n\n### Response:\n")


@pytest.mark.parametrize("name, stops", [
    ("alpaca", ("### Instruction:",)), ("dolly", ("### End",)), ("vicuna", ("</s>",)), ("koala", ("</s>",)),
    ("baize", ("[|Human|]", "[|AI|]")), ("openchatkit", ("<human>:",)), ("raven", ("\n\n",)),
    ("rwkv-world", ("\n\n",)), ("oasst", ("<|endoftext|>",)), ("falcon", ("\nUser",)), ("olmo", ("<|endoftext|>",)),
    ("chatml", ("<|im_end|>",)), ("gemma", ("<end_of_turn>",)), ("chatglm3", ("<|user|>", "<|observation|>")),
    # hpcaitech/ColossalAI coati/dataset/conversation.py @ 47932be: SeparatorStyle.ADD_EOS_TOKEN, sep "</s>"
    ("colossalchat", ("</s>",)),
    # nomic-ai/gpt4all gpt4all-backend llmodel_shared.cpp: the reversePrompts set, in its order
    ("gpt4all", ("### Instruction", "### Prompt", "### Response", "### Human", "### Assistant", "### Context")),
    # tloen/alpaca-lora generate.py stops at EOS and splits on "### Response:"; a next "### Instruction:" header
    # means the model went on to invent the next task (convention, as for alpaca)
    ("alpaca-lora", ("### Instruction:",)),
    # clue-ai/ChatYuan README.md: a T5 model, the answer is the decoder's whole output up to its EOS; no stop text
    ("chatyuan", ()),
])
def test_stop_sequences(name, stops):
    assert templates.render(name, A).stop == stops


def test_chatglm_family_is_chatglm3_and_v1_stays_by_name():
    # llama.cpp's `chatglm` architecture and convert_hf_to_gguf.py ChatGLMModel take ChatGLM3 (and GLM-4)
    assert families.get("chatglm").template == "chatglm3"
    assert families.get("chatglm-6b").template == "chatglm" and families.get("chatglm-6b").engine == "none"
    assert families.get("opt").engine == "none", "OPT has no route: the onnx backend does not generate text"


def test_rwkv_messages_never_hold_a_turn_break():
    # ChatRWKV README: "avoid \n\n" inside a message
    text = templates.render("raven", [Message("user", "line one\n\nline two\r\n")]).text
    assert text == "Bob: line one\nline two\n\nAlice:"


def test_every_family_names_a_known_template():
    for family in families.FAMILIES.values():
        assert family.template in templates.names(), family.name


def test_unknown_template():
    with pytest.raises(KeyError, match="known: "):
        templates.render("nope", [])
