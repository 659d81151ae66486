"""Read a GGUF file's key/value metadata without loading the model (and without numpy or the engine).

Used in the parent process, where importing llama.cpp or mapping gigabytes of weights would defeat the point of
keeping the engine in a child: memory admission needs the architecture's sizes, and `models` commands show them.
Arrays are not kept, only their length (a vocabulary is 30k-260k strings), except short ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import ModelError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KEEP_ARRAYS_UP_TO = 64


@dataclass(frozen=True)
class ArrayInfo:
    """An array value that was skipped: its element type and length."""

    element_type: int
    length: int


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(fh: BinaryIO) -> str:
    length = _read(fh, "<Q")
    if length > 1 << 26:
        raise ValueError(f"implausible string length {length}")
    data = fh.read(length)
    if len(data) != length:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(fh: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(fh, _SCALARS[kind])
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        element, length = _read(fh, "<I"), _read(fh, "<Q")
        if length <= KEEP_ARRAYS_UP_TO:
            return [_value(fh, element) for _ in range(length)]
        if element in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[element]) * length, 1)
        elif element == _STRING:
            for _ in range(length):
                fh.seek(_read(fh, "<Q"), 1)
        else:
            raise ValueError(f"unsupported nested array of type {element}")
        return ArrayInfo(element, length)
    raise ValueError(f"unknown value type {kind}")


def read_metadata(path: Path) -> dict[str, Any]:
    """All key/value pairs of a GGUF header. Raises ModelError naming the file when it is not a GGUF."""
    try:
        with path.open("rb", buffering=1 << 20) as fh:
            if fh.read(4) != MAGIC:
                raise ModelError(f"{path} is not a GGUF file (bad magic)")
            version = _read(fh, "<I")
            if version < 2:
                raise ModelError(f"{path}: GGUF version {version} is too old")
            _read(fh, "<Q")  # tensor count
            kv_count = _read(fh, "<Q")
            metadata: dict[str, Any] = {"GGUF.version": version}
            for _ in range(kv_count):
                key = _string(fh)
                metadata[key] = _value(fh, _read(fh, "<I"))
            return metadata
    except (EOFError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: damaged GGUF header ({exc or 'truncated'})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from None


@dataclass(frozen=True)
class Architecture:
    """The sizes that decide how much memory a transformer needs."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    context_train: int
    sliding_window: int = 0  # {arch}.attention.sliding_window: the window of the sliding-window layers, 0 if none

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], path: Path) -> Architecture:
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelError(f"{path}: no general.architecture in the GGUF metadata")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if isinstance(value, list):  # per-layer values (some architectures): the largest bounds the memory
                value = max(value) if value else default
            return value

        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        if not n_embd or not n_head:
            raise ModelError(f"{path}: the GGUF lacks {arch}.embedding_length / {arch}.attention.head_count")
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens or []) or get("vocab_size", 32000)
        return cls(name=arch, n_layer=get("block_count", 1), n_embd=n_embd, n_head=n_head,
                   n_head_kv=get("attention.head_count_kv", n_head),
                   head_dim_k=get("attention.key_length", n_embd // n_head),
                   head_dim_v=get("attention.value_length", n_embd // n_head),
                   n_ff=get("feed_forward_length", 4 * n_embd), n_vocab=n_vocab,
                   context_train=get("context_length", 0), sliding_window=get("attention.sliding_window", 0))
