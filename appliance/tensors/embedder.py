"""Sentence embeddings in the ONNX worker: text -> tokens (a Hugging Face ``tokenizer.json`` through the
``tokenizers`` library) -> the model's token vectors -> one vector per text.

The pooling is what sentence-transformers does for all-MiniLM-L6-v2 (its ``modules.json``: Transformer, then
Pooling with ``pooling_mode_mean_tokens``, then Normalize): the mean of the last hidden state over the real tokens
(the attention mask), then L2 normalisation, so a dot product of two vectors is their cosine similarity.

A text longer than the entry's ``max_tokens`` (sentence-transformers' ``max_seq_length``, special tokens included)
is refused with ``bad_request`` naming the limit, unless the request asked to truncate: a vector of a silently cut
text would describe only its beginning. Texts run in batches of :data:`BATCH`, padded to the longest of the batch;
the mask keeps the padding out of the mean. Runs only in the worker process (imports onnxruntime and tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.backends.onnx import OnnxSessions
from appliance.catalog.entry import ModelEntry
from appliance.errors import BackendUnavailable, BadRequest, ModelError

BATCH = 16  # texts per onnxruntime run: bounds the padded batch's memory (16 x 256 tokens x 384 floats ~ 6 MB)


@dataclass(frozen=True)
class Vectors:
    vectors: list[list[float]]
    tokens: int  # tokens read, special tokens included


class Embedder:
    """The tokenizers and sessions of the catalog's embedders, each opened on its first request."""

    def __init__(self, sessions: OnnxSessions) -> None:
        self.sessions = sessions
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, entry: ModelEntry) -> Any:
        path = entry.tokenizer or ""
        if path not in self._tokenizers:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise BackendUnavailable("embedding models need tokenizers: pip install 'appliance[onnx]'") from None
            try:
                tokenizer = Tokenizer.from_file(path)
            except Exception as exc:  # tokenizers raises its own exception type
                raise ModelError(f"model '{entry.id}': cannot read its tokenizer {path}: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
            # the file's own truncation and fixed padding (all-MiniLM's says 128) are not the model's limit:
            # lengths are checked below against max_tokens, and each batch is padded to its longest text
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._tokenizers[path] = tokenizer
        return self._tokenizers[path]

    def embed(self, entry: ModelEntry, texts: Sequence[str], truncate: bool) -> Vectors:
        import numpy as np

        limit = entry.max_tokens
        assert limit is not None  # the catalog refuses an embedder without one
        encodings = self.tokenizer(entry).encode_batch(list(texts))
        rows: list[list[int]] = []
        for i, encoding in enumerate(encodings):
            ids = list(encoding.ids)
            if len(ids) > limit:
                if not truncate:
                    raise BadRequest(f"input[{i}] is {len(ids)} tokens; model '{entry.id}' takes at most {limit} "
                                     f"(max_tokens, special tokens included): shorten it, split it, or ask to "
                                     f"truncate", param=f"input[{i}]" if len(texts) > 1 else "input")
                ids = ids[:limit - 1] + ids[-1:]  # keep the closing special token ([SEP]), as tokenizers would
            rows.append(ids)
        names = {i.name for i in self.sessions.get(entry).get_inputs()}
        vectors = []
        for start in range(0, len(rows), BATCH):
            vectors.append(self._run(entry, rows[start:start + BATCH], names))
        pooled = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
        return Vectors(pooled.tolist(), sum(len(r) for r in rows))

    def _run(self, entry: ModelEntry, rows: list[list[int]], names: set[str]) -> Any:
        import numpy as np

        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)  # one segment: a sentence, not a pair
        hidden = next(iter(self.sessions.run(entry, feeds).values()))  # the first output: the token vectors
        if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
            raise ModelError(f"model '{entry.id}': its first output has shape {tuple(hidden.shape)}; an embedder's "
                             f"is (batch, tokens, dimensions)")
        return mean_pool_normalise(hidden, mask)


def mean_pool_normalise(hidden: Any, mask: Any) -> Any:
    """sentence-transformers' Pooling(mean) then Normalize: ``(batch, tokens, dims)`` -> ``(batch, dims)`` float32
    rows of length 1 (a row of zeros stays zeros)."""
    import numpy as np

    weights = mask[..., None].astype(np.float32)
    summed = (hidden.astype(np.float32) * weights).sum(axis=1)
    pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
