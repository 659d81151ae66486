"""The two vocabularies RWKV chat models use, as token ids <-> bytes.

- **World** (RWKV-5/6/7 World and later Raven-World): ``rwkv_vocab_v20230424.txt``, shipped inside the ``rwkv``
  package. The package's own ``TRIE_TOKENIZER`` builds a Python trie of 256-slot lists: ~2.5 s and ~295 MB on a
  desktop, far too much beside a model on a 1 GB Pi. :class:`WorldVocab` reads the same file into two dicts and does
  the same greedy longest-match, so it gives the same ids (a test compares the two) in ~0.5 s and ~15 MB.
- **Pile / "20B"** (Raven RWKV-4): the GPT-NeoX byte-level BPE in ``20B_tokenizer.json``, which the rwkv package
  does not ship; the catalog entry names the file and the ``tokenizers`` package (an rwkv dependency) reads it.

Generated tokens are turned back into **bytes**, not text: one token is often half of a UTF-8 character, and the
backend decodes the byte stream incrementally.
"""

from __future__ import annotations

import ast
from pathlib import Path

from appliance.errors import ModelError

WORLD = "world"
END_OF_TEXT = 0  # id 0 ends a document in both vocabularies


class WorldVocab:
    """Greedy longest-match over the World vocabulary, identical in output to ``rwkv.rwkv_tokenizer``."""

    def __init__(self, vocab_file: Path | None = None) -> None:
        self._bytes: dict[int, bytes] = {}
        for line in (vocab_file or world_vocab_file()).read_text(encoding="utf-8").splitlines():
            # "<id> <python literal> <byte length>", parsed as the rwkv package parses it
            first, last = line.index(" "), line.rindex(" ")
            token = ast.literal_eval(line[first + 1:last])
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(line[last + 1:]):
                raise ModelError(f"World vocabulary line {line[:first]}: length mismatch")
            self._bytes[int(line[:first])] = token
        self._ids = {token: i for i, token in self._bytes.items()}
        # candidate token lengths per two-byte prefix, longest first (every single byte is a token)
        lengths: dict[bytes, set[int]] = {}
        for token in self._ids:
            if len(token) > 1:
                lengths.setdefault(token[:2], set()).add(len(token))
        self._lengths = {prefix: sorted(sizes, reverse=True) for prefix, sizes in lengths.items()}

    @property
    def size(self) -> int:
        return max(self._bytes) + 1

    def encode(self, text: str) -> list[int]:
        data, ids, at = text.encode("utf-8"), [], 0
        while at < len(data):
            for length in self._lengths.get(data[at:at + 2], ()):
                token = self._ids.get(data[at:at + length]) if at + length <= len(data) else None
                if token is not None:
                    break
            else:
                length, token = 1, self._ids[data[at:at + 1]]
            ids.append(token)
            at += length
        return ids

    def token_bytes(self, token: int) -> bytes:
        return self._bytes.get(token, b"")  # 0 (end of text) and ids past the vocabulary have no text


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: byte-level BPE writes every byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class PileVocab:
    """A byte-level BPE ``tokenizer.json`` (Raven's ``20B_tokenizer.json``) through the ``tokenizers`` package."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer  # lazy: installed with the rwkv extra

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise ModelError(f"tokenizer {path}: cannot be read ({exc})") from None
        self._byte_of = _gpt2_byte_decoder()
        self._added = {i: (b"" if t.special else t.content.encode("utf-8"))
                       for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    @property
    def size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token: int) -> bytes:
        cached = self._cache.get(token)
        if cached is None:
            if token in self._added:
                cached = self._added[token]
            else:
                piece = self._tokenizer.id_to_token(token)
                cached = b"" if piece is None else bytes(self._byte_of.get(c, 0x3F) for c in piece)
            self._cache[token] = cached
        return cached


def world_vocab_file() -> Path:
    try:
        import rwkv  # the package's __init__ is empty: this imports neither torch nor the model code
    except ImportError:
        raise ModelError("the World vocabulary comes with the rwkv package: pip install 'appliance[rwkv]'") from None
    return Path(next(iter(rwkv.__path__))) / "rwkv_vocab_v20230424.txt"


def open_vocabulary(spec: str) -> WorldVocab | PileVocab:
    """``"world"`` or the path of a tokenizer JSON file."""
    if spec == WORLD:
        return WorldVocab()
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"tokenizer file {path} not found (a Raven model needs its 20B_tokenizer.json)")
    return PileVocab(path)
