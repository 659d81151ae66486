"""The rwkv backend's probe: what can be known about an RWKV model without torch (its file name, its checkpoint's
layout, its vocabulary) and how much memory it will take.

The parent process runs these checks before it replaces the loaded model, so a catalog mistake (a Raven model
without its tokenizer, a file that is not a checkpoint) is refused while the current model keeps serving.

**Memory.** An RWKV checkpoint is not mapped: the rwkv package reads the whole file and converts every tensor to the
strategy's types, so the estimate is the converted weights (plus a quarter for allocator and TorchScript overhead),
a second copy of the file while it converts, torch itself, and under ``i8`` three float copies of the largest
matrix, which it dequantises on every forward (the temporaries of ``(w + 0.5) * ry * rx + my + mx``). Against the
peak RSS of the backend on a 96M-parameter RWKV-6 checkpoint it errs high by 8-28% under ``cpu fp32``, ``cpu bf16``
and ``cpu fp32i8`` (docs/benchmarks-rwkv.md, written by ``make bench-rwkv``; summarised in docs/models.md). Other
sizes and RWKV-7 are not in that record.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.backends.probe import Footprint, MiB, Probe
from appliance.backends.rwkv_vocab import WORLD
from appliance.catalog.pth_meta import PILE_VOCAB, WORLD_VOCAB_MIN, Checkpoint, engine_strategy, read_checkpoint
from appliance.errors import ModelError

if TYPE_CHECKING:
    from appliance.backends.base import EngineSettings
    from appliance.catalog.entry import ModelEntry

F32 = 4
TORCH_RUNTIME = 256 * MiB  # torch and rwkv.model imported: 232 MiB of RSS measured on x86-64
RWKV_OVERHEAD = 1.25  # resident weights over the converted tensors' size (measured 1.04-1.22)


def vocabulary_of(entry: ModelEntry, checkpoint: Checkpoint) -> str:
    """The catalog's tokenizer, else the World vocabulary, except for a Raven-sized model that needs its file."""
    if entry.tokenizer:
        return entry.tokenizer
    if checkpoint.n_vocab == PILE_VOCAB:
        raise ModelError(f"model '{entry.id}' has the Raven (RWKV-4 Pile) vocabulary of {PILE_VOCAB} tokens: name "
                         f"its 20B_tokenizer.json in the catalog entry (tokenizer = \"20B_tokenizer.json\")")
    return WORLD


def inspect(entry: ModelEntry) -> tuple[Checkpoint, str]:
    """The checkpoint's layout and the vocabulary it will use; ModelError naming what does not fit."""
    if entry.path.suffix != ".pth":
        raise ModelError(f"model '{entry.id}': an RWKV checkpoint must be named *.pth (the rwkv loader adds "
                         f"the suffix itself), not {entry.path.name}")
    checkpoint = read_checkpoint(entry.path)
    vocabulary = vocabulary_of(entry, checkpoint)
    if vocabulary == WORLD and checkpoint.n_vocab < WORLD_VOCAB_MIN:
        raise ModelError(f"model '{entry.id}': its embedding has {checkpoint.n_vocab} rows, too few for the World "
                         f"vocabulary (ids up to {WORLD_VOCAB_MIN - 1}); name its tokenizer file in the catalog "
                         f"entry (tokenizer = \"...json\")")
    if vocabulary != WORLD and not Path(vocabulary).is_file():
        raise ModelError(f"model '{entry.id}': tokenizer file {vocabulary} not found")
    return checkpoint, vocabulary


class RwkvProbe(Probe):
    def check(self, entry: ModelEntry) -> None:
        inspect(entry)

    def footprint(self, entry: ModelEntry, settings: EngineSettings, margin: int) -> Footprint:
        checkpoint = read_checkpoint(entry.path)
        strategy = engine_strategy(entry.strategy or settings.rwkv_strategy, checkpoint.version)
        dequantised = 3 * checkpoint.largest_matrix() * F32 if "i8" in strategy else 0
        return Footprint(model_id=entry.id, weights=int(checkpoint.runtime_bytes(strategy) * RWKV_OVERHEAD),
                         kv_cache=checkpoint.state_bytes(),
                         compute=TORCH_RUNTIME + entry.path.stat().st_size + dequantised + checkpoint.n_vocab * F32,
                         margin=margin, mapped=False, cache_name="state")

    def facts(self, entry: ModelEntry) -> dict[str, Any]:
        checkpoint, vocabulary = inspect(entry)
        return {"rwkv_version": checkpoint.version, "layers": checkpoint.n_layer, "embedding": checkpoint.n_embd,
                "vocabulary": "world" if vocabulary == WORLD else f"{checkpoint.n_vocab} tokens"}
