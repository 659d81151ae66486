"""The model architectures the bundled llama.cpp (llama-cpp-python 0.3.36) can load.

Copied from ``LLM_ARCH_NAMES`` in vendor/llama.cpp/src/llama-arch.cpp of the llama-cpp-python 0.3.36 sdist. A
GGUF whose ``general.architecture`` is not here is refused with ``unsupported_architecture`` before llama.cpp sees
it (OPT, for one, has never been in llama.cpp). Some of these only embed or encode (bert, t5encoder, clip): they
load but cannot generate text. Update this list together with the llama-cpp-python pin.
"""

from pathlib import Path

from appliance.catalog.gguf_meta import read_metadata
from appliance.errors import UnsupportedArchitecture

LLAMA_CPP_ARCHITECTURES = frozenset(  # the list as it reads in llama-arch.cpp
    """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert nomic-bert
    nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 qwen2moe qwen2vl qwen3
    qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell
    orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2
    mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer
    openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5
    t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7
    granite granitemoe granitehybrid graniteswitch granite_swa chameleon plm bailingmoe bailingmoe2 bailingmoe3
    dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4
    smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text
    minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr
    """.split()  # noqa: SIM905
)

#: names llama.cpp knows but has no implementation for (it refuses them at load)
NOT_IMPLEMENTED = frozenset({"gptj"})

#: architectures llama.cpp loads that do not generate text
NOT_GENERATIVE = frozenset({"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
                            "jina-bert-v3", "eurobert", "t5encoder", "gemma-embedding", "clip"})


#: what to do instead, for the architectures of seed families that no backend here can generate with
INSTEAD = {
    "opt": ("OPT has no route in this appliance: llama.cpp never implemented it and the onnx backend runs tensor "
            "models, not text generation. For a model of similar size use a supported architecture, e.g. Pythia "
            "(gptneox, 160M to 12B against OPT's 125M to 13B) or a LLaMA-family model at 7B"),
    "gptj": ("GPT-J (GPT4All-J) has no route in this appliance: the onnx backend runs tensor models, not text "
             "generation. GPT4All's later models are LLaMA/Mistral-based GGUFs that load here; Pythia-6.9B "
             "(gptneox, the base of Dolly 2.0) is of similar size"),
}


def check_architecture(path: Path) -> str:
    """The GGUF's architecture, or UnsupportedArchitecture naming it when llama.cpp cannot generate with it."""
    arch = read_metadata(path).get("general.architecture")
    instead = INSTEAD.get(arch, "choose a model of an architecture it supports (docs/models.md lists them)")
    if arch not in LLAMA_CPP_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{path.name}: architecture {arch!r} is not supported by the bundled llama.cpp (llama-cpp-python 0.3.36); "
            f"{instead}")
    if arch in NOT_IMPLEMENTED:
        raise UnsupportedArchitecture(
            f"{path.name}: architecture {arch!r} is named in llama.cpp but not implemented there; {instead}")
    if arch in NOT_GENERATIVE:
        raise UnsupportedArchitecture(f"{path.name}: architecture {arch!r} embeds or encodes, it cannot generate text; "
                                      f"an ONNX export of such a model can serve classifications on the infer route")
    return arch
