"""Reading an RWKV ``.pth`` checkpoint's layout (tensor names, shapes, dtypes) without torch, and what the rwkv
loader will make of it in memory.

The parent process never imports torch (it costs ~220 MB and 1.5 s), yet it must refuse a checkpoint that cannot
work and estimate its memory before a worker loads it. A checkpoint written by ``torch.save`` is a zip archive whose
``data.pkl`` describes every tensor; tensor data lives in separate entries that are never read here. The unpickler
accepts only the few globals a plain tensor dictionary needs, like ``torch.load(weights_only=True)``, so a
checkpoint cannot run code while being inspected.
"""

from __future__ import annotations

import collections
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ModelError

#: bytes per element of the storage types torch.save writes
_STORAGE_BYTES = {"FloatStorage": 4, "BFloat16Storage": 2, "HalfStorage": 2, "DoubleStorage": 8,
                  "LongStorage": 8, "IntStorage": 4, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1}
WORLD_VOCAB_MIN = 65530  # the World vocabulary's ids run to 65529
PILE_VOCAB = 50277  # the GPT-NeoX "20B" vocabulary of Raven (RWKV-4 Pile) models


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """What the rwkv loader would find in a checkpoint, read from its header only."""

    path: Path
    tensors: dict[str, TensorInfo]

    @property
    def version(self) -> int:
        """4, 5, 6 or 7, decided from the keys the way ``rwkv.model`` does (7 by its ``r_k`` bonus)."""
        keys = self.tensors.keys()
        if any(k.endswith("att.r_k") for k in keys):
            return 7
        if any("time_maa" in k for k in keys):
            return 6
        if any("ln_x" in k for k in keys):
            return 5
        return 4

    @property
    def n_vocab(self) -> int:
        return self.tensors["emb.weight"].shape[0]

    @property
    def n_embd(self) -> int:
        return self.tensors["emb.weight"].shape[1]

    @property
    def n_layer(self) -> int:
        return 1 + max((int(k.split(".")[1]) for k in self.tensors if k.startswith("blocks.")), default=-1)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def runtime_bytes(self, strategy: str) -> int:
        """Weights in memory after the loader converted them for ``strategy`` (``cpu fp32``, ``cpu fp32i8``...).

        ``i8`` keeps every matrix except the embedding and the small LoRA-style ``w1``/``w2`` as uint8 (plus four
        float vectors per matrix); everything else takes the strategy's float type.
        """
        dtype = strategy.split()[1] if len(strategy.split()) > 1 else "fp32"
        width = 4 if dtype.startswith("fp32") else 2
        total = 0
        for name, info in self.tensors.items():
            quantised = (dtype.endswith("i8") and len(info.shape) == 2 and name != "emb.weight"
                         and not name.endswith(("_w1", "_w2")))
            if quantised:
                total += info.numel + 4 * 4 * sum(info.shape)
            else:
                total += info.numel * (4 if ".ln_x." in name else width)
        return total

    def largest_matrix(self) -> int:
        """Elements of the largest matrix (the head, usually): ``i8`` dequantises each matrix on every call."""
        return max((t.numel for t in self.tensors.values() if len(t.shape) == 2), default=0)

    def state_bytes(self) -> int:
        """The recurrent state one generation carries (fp32): small and independent of the context length."""
        per_layer = 5 * self.n_embd if self.version == 4 else 2 * self.n_embd + self.n_embd * 64
        return self.n_layer * per_layer * 4


def engine_strategy(strategy: str, version: int) -> str:
    """The strategy the loader gets: RWKV-7's takes one plain ``device dtype`` (no int8, no per-layer split)."""
    if version != 7:
        return strategy
    device, dtype = strategy.split("->")[0].split()[:2]
    return f"{device} {dtype.removesuffix('i8')}"


class _Storage:
    def __init__(self, type_name: str) -> None:
        self.itemsize = _STORAGE_BYTES.get(type_name, 4)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *args: object) -> TensorInfo:
    return TensorInfo(tuple(int(d) for d in size), storage.itemsize)


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_BYTES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights-only checkpoint")

    def persistent_load(self, pid: tuple[str, ...]) -> _Storage:
        # torch.save: ("storage", storage type, key, location, numel)
        return _Storage(pid[1])


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensor layout of ``path``; ModelError naming the problem when it is not a checkpoint we can read."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise ModelError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
            with archive.open(pickles[0]) as stream:
                content = _HeaderUnpickler(stream).load()
    except zipfile.BadZipFile:
        raise ModelError(f"{path}: not a torch zip checkpoint (files saved by torch < 1.6 must be re-saved with "
                         f"a current torch)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as exc:
        raise ModelError(f"{path}: unreadable checkpoint: {exc}") from None
    if not isinstance(content, dict):
        raise ModelError(f"{path}: the checkpoint holds a {type(content).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in content.items() if isinstance(v, TensorInfo)}
    if "emb.weight" not in tensors or "head.weight" not in tensors or not any(k.startswith("blocks.") for k in tensors):
        raise ModelError(f"{path}: not an RWKV checkpoint (no emb.weight, blocks.* and head.weight tensors)")
    return Checkpoint(path=path, tensors=tensors)
