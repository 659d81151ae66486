"""What can be checked about an RWKV model without torch: its file name, its checkpoint and its vocabulary.

The parent process runs these checks before it replaces the loaded model, so a catalog mistake (a Raven model
without its tokenizer, a file that is not a checkpoint) is refused while the current model keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from appliance.backends.rwkv_vocab import WORLD
from appliance.catalog import ModelEntry
from appliance.catalog.pth_meta import PILE_VOCAB, WORLD_VOCAB_MIN, Checkpoint, read_checkpoint
from appliance.errors import ModelError


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
