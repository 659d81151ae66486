"""The model families people bring to the appliance: their prompt format, engine and licence, as defaults for
``appliance models add``. A catalog entry can always say otherwise; these are starting points an operator should
check against the model card of the exact weights they copy onto a device.

``commercial_use``: True where the licence allows it (possibly with conditions, as Llama 2's community licence or
Gemma's terms), False for research-only weights (the LLaMA-1 derived wave: Alpaca, Vicuna v1.1, Koala, Baize,
ColossalChat; OPT), None where it depends on the exact release.

``chatglm`` is ChatGLM3-6B: llama.cpp's ``chatglm`` architecture, and its convert_hf_to_gguf.py, take ChatGLM3 (and
GLM-4), so that is what a ChatGLM GGUF holds. The first ChatGLM-6B, whose prompt format is the ``chatglm`` template,
has no llama.cpp route; it stays here by name as ``chatglm-6b`` for a catalog that points at such weights anyway.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    licence: str
    commercial_use: bool | None
    engine: str  # how it runs here: llama_cpp (GGUF), rwkv (.pth), onnx (tensors only), none (no route here)
    source: str = ""


_LLAMA1 = "research only: LLaMA-1 weights (non-commercial licence)"

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("alpaca", "alpaca", _LLAMA1 + "; Alpaca data CC BY-NC 4.0", False, "llama_cpp",
           "https://github.com/tatsu-lab/stanford_alpaca"),
    Family("alpaca-lora", "alpaca-lora", _LLAMA1 + "; adapter Apache-2.0", False, "llama_cpp",
           "https://github.com/tloen/alpaca-lora"),
    Family("vicuna", "vicuna", _LLAMA1 + " (v1.1; v1.5 is under the Llama 2 Community License)", False, "llama_cpp",
           "https://github.com/lm-sys/FastChat"),
    Family("koala", "koala", _LLAMA1 + "; research preview", False, "llama_cpp",
           "https://bair.berkeley.edu/blog/2023/04/03/koala/"),
    Family("gpt4all", "gpt4all", "GPT4All-J: Apache-2.0; the LLaMA-based GPT4All: research only", None, "llama_cpp",
           "https://github.com/nomic-ai/gpt4all"),
    Family("raven", "raven", "Apache-2.0", True, "rwkv", "https://huggingface.co/BlinkDL/rwkv-4-raven"),
    Family("rwkv-world", "rwkv-world", "Apache-2.0", True, "rwkv", "https://huggingface.co/BlinkDL/rwkv-6-world"),
    Family("openchatkit", "openchatkit", "Apache-2.0", True, "llama_cpp",
           "https://github.com/togethercomputer/OpenChatKit"),
    Family("dolly", "dolly", "MIT (weights); databricks-dolly-15k CC BY-SA 3.0", True, "llama_cpp",
           "https://github.com/databrickslabs/dolly"),
    Family("open-assistant", "oasst", "Apache-2.0 (Pythia-based releases)", True, "llama_cpp",
           "https://github.com/LAION-AI/Open-Assistant"),
    Family("baize", "baize", _LLAMA1 + "; data CC BY-NC 4.0", False, "llama_cpp",
           "https://github.com/project-baize/baize-chatbot"),
    Family("colossalchat", "colossalchat", _LLAMA1, False, "llama_cpp",
           "https://github.com/hpcaitech/ColossalAI/tree/main/applications/Chat"),
    Family("opt", "plain", "OPT License Agreement: non-commercial research", False, "none",
           "https://github.com/facebookresearch/metaseq"),
    Family("flan-t5", "plain", "Apache-2.0", True, "llama_cpp", "https://huggingface.co/google/flan-t5-base"),
    Family("chatyuan", "chatyuan", "see the model card of the exact release", None, "llama_cpp",
           "https://github.com/clue-ai/ChatYuan"),
    Family("chatglm", "chatglm3", "ChatGLM3-6B model licence: research free, commercial use after registration",
           None, "llama_cpp", "https://github.com/THUDM/ChatGLM3"),
    Family("chatglm-6b", "chatglm", "ChatGLM-6B model licence: research free, commercial use after registration",
           None, "none", "https://github.com/THUDM/ChatGLM-6B"),
    Family("llama", "plain", _LLAMA1, False, "llama_cpp", "https://github.com/meta-llama/llama"),
    Family("llama-2", "llama-2", "Llama 2 Community License (commercial use allowed, with conditions)", True,
           "llama_cpp", "https://github.com/meta-llama/llama"),
    Family("mistral", "mistral", "Apache-2.0", True, "llama_cpp", "https://mistral.ai/news/announcing-mistral-7b"),
    Family("falcon", "falcon", "Apache-2.0 (Falcon-7B/40B)", True, "llama_cpp", "https://huggingface.co/tiiuae"),
    Family("olmo", "olmo", "Apache-2.0", True, "llama_cpp", "https://allenai.org/olmo"),
    Family("gemma", "gemma", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", True, "llama_cpp",
           "https://ai.google.dev/gemma"),
    Family("smollm2", "chatml", "Apache-2.0", True, "llama_cpp", "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    Family("qwen2.5", "chatml", "Apache-2.0 (0.5B, 1.5B, 7B, 14B, 32B); the 3B and 72B have Qwen licences of their "
           "own: see the model card", None, "llama_cpp", "https://huggingface.co/Qwen"),
    Family("chatml", "chatml", "see the model card", None, "llama_cpp"),
    Family("bert", "plain", "Apache-2.0 (most BERT-class classifiers; check the model card)", True, "onnx"),
)}

UNKNOWN = Family("unknown", "chatml", "unknown", None, "llama_cpp")


def get(name: str) -> Family:
    return FAMILIES.get(name, UNKNOWN)


def names() -> list[str]:
    return sorted(FAMILIES)
