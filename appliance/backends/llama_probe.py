"""The llama.cpp backend's probe: can the bundled llama.cpp run this GGUF, and how much memory will it take?

**Architectures.** Copied from ``LLM_ARCH_NAMES`` in vendor/llama.cpp/src/llama-arch.cpp of the llama-cpp-python
0.3.36 sdist. A GGUF whose ``general.architecture`` is not here is refused with ``unsupported_architecture`` before
llama.cpp sees it (OPT, for one, has never been in llama.cpp). Some of these only embed or encode (bert, t5encoder,
clip): they load but cannot generate text. Update this list together with the llama-cpp-python pin.

**Memory.** A llama.cpp model needs its weights (the file, memory-mapped), a KV cache for the configured context
(f16 keys and values for every layer), compute buffers and the logits buffer. The compute buffer is the largest of
the logits of one micro-batch (``n_vocab x n_ubatch`` floats: 256 MiB for Gemma-3's 262k vocabulary at a batch of
256) and the attention scores (``n_ctx x n_ubatch x n_head`` floats), plus the feed-forward activations. The formula
matches what llama.cpp 0.3.36 reports for the test models and Gemma-3 within a few percent, erring high;
``memory.margin_mib`` covers the worker process itself.

The header is read once per version of the file (path, size, modification time), whatever is asked of it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.backends.probe import Footprint, Probe
from appliance.catalog.gguf_meta import Architecture, read_metadata
from appliance.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from appliance.backends.base import EngineSettings
    from appliance.catalog.entry import ModelEntry

F16 = 2
F32 = 4
MAX_UBATCH = 512  # llama-cpp-python's default n_ubatch; the micro-batch is min(n_batch, this)
#: sliding-window families (vendor/llama.cpp/src/models/<arch>.cpp): (every n-th layer attends to the whole context,
#: the window when the GGUF names none); others count every layer at full context, which errs high for any other
#: sliding-window architecture
SLIDING_LAYERS = {"gemma2": (2, 4096), "gemma3": (6, 0)}

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


@functools.lru_cache(maxsize=16)
def _header(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    return read_metadata(path)


def header(path: Path) -> dict[str, Any]:
    """The GGUF's metadata, read once per version of the file."""
    try:
        stat = path.stat()
    except OSError:
        return read_metadata(path)  # raises ModelError naming the file
    return _header(path, stat.st_size, stat.st_mtime_ns)


def check_architecture(path: Path) -> str:
    """The GGUF's architecture, or UnsupportedArchitecture naming it when llama.cpp cannot generate with it."""
    arch = header(path).get("general.architecture")
    instead = INSTEAD.get(str(arch), "choose a model of an architecture it supports (docs/models.md lists them)")
    if not isinstance(arch, str) or arch not in LLAMA_CPP_ARCHITECTURES:
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


def step_tokens(settings: EngineSettings) -> int:
    """The most tokens one decode holds, llama.cpp's ``n_batch`` for the context (llama_batch.make_context): a prompt
    chunk of ``worker.batch_size`` and, with several slots, a token of every slot beside it (one slot never decodes
    both at once, so it gets Llama's own n_batch)."""
    return settings.batch_size + (settings.parallel if settings.parallel > 1 else 0)


def kv_cells(arch: Architecture, n_ctx: int, n_ubatch: int) -> int:
    """KV cells of one sequence over all layers. A sliding-window layer keeps its window and a micro-batch, in
    multiples of 256 cells (llama_kv_cache_iswa, as the batch context makes it: llama_batch.make_context)."""
    pattern, default_window = SLIDING_LAYERS.get(arch.name, (0, 0))
    window = arch.sliding_window or default_window
    if not pattern or not window:
        return arch.n_layer * n_ctx
    sliding = sum(1 for layer in range(arch.n_layer) if layer % pattern < pattern - 1)
    return (arch.n_layer - sliding) * n_ctx + sliding * (-(-min(n_ctx, window + n_ubatch) // 256) * 256)


def llama_footprint(model_id: str, arch: Architecture, weights: int, settings: EngineSettings,
                    margin: int) -> Footprint:
    """What llama.cpp allocates for a model of these sizes (also the model shelf's estimate, with no file at hand)."""
    n_ctx = settings.context_size
    n_ubatch = min(step_tokens(settings), MAX_UBATCH)
    # every slot has a context_size of its own
    kv = (settings.parallel * kv_cells(arch, n_ctx, n_ubatch) * arch.n_head_kv * (arch.head_dim_k + arch.head_dim_v)
          * F16)
    compute = (max(arch.n_vocab * n_ubatch, n_ctx * n_ubatch * arch.n_head) * F32
               + n_ubatch * (8 * arch.n_embd + 3 * arch.n_ff) * F32
               + arch.n_vocab * F32  # the output (logits) buffer
               # each slot's copy of its prompt's last logits, and the candidates they are sampled as
               # (llama_logits.py): 4 bytes a token per slot, 20 once
               + arch.n_vocab * (4 * settings.parallel + 20))
    return Footprint(model_id=model_id, weights=weights, kv_cache=kv, compute=compute, margin=margin)


class LlamaProbe(Probe):
    def check(self, entry: ModelEntry) -> None:
        check_architecture(entry.path)

    def footprint(self, entry: ModelEntry, settings: EngineSettings, margin: int) -> Footprint:
        check_architecture(entry.path)  # an architecture llama.cpp cannot run is refused as such, not as a size
        arch = Architecture.from_metadata(header(entry.path), entry.path)
        return llama_footprint(entry.id, arch, entry.path.stat().st_size, settings, margin)

    def facts(self, entry: ModelEntry) -> dict[str, Any]:
        arch = check_architecture(entry.path)
        meta = header(entry.path)
        return {"architecture": arch, "context": meta.get(f"{arch}.context_length"),
                "chat_template": isinstance(meta.get("tokenizer.chat_template"), str), "name": meta.get("general.name")}
