"""Text to a classifier's input tensor, for the moderation filter: how the ``featurize`` key of a catalog entry turns
each prompt or message into one row of numbers.

``hashed-words`` (the one scheme so far): the text is lower-cased and split into words, runs of Unicode letters,
digits and underscores (Python's ``\\w+``); element ``i`` of the row counts the words whose CRC-32 (of their UTF-8
bytes) modulo the row's size is ``i``. The row's size is the input's last dimension, which the entry must fix. CRC-32
is in zlib and in every language's standard library, so whoever trains a classifier can compute the same features;
there is no vocabulary file to ship or get out of step. A BERT-class model that takes token ids needs its own
tokenizer instead, which this scheme is not.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

from appliance.catalog.entry import TensorSpec

FEATURIZERS = ("hashed-words",)
_WORD = re.compile(r"\w+")


def hashed_words(texts: Sequence[str], size: int) -> Any:
    """One row of word counts per text, ``(len(texts), size)`` float32."""
    import numpy as np

    rows = np.zeros((len(texts), size), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            rows[i, zlib.crc32(word.encode("utf-8")) % size] += 1
    return rows


def problem(scheme: str, inputs: tuple[TensorSpec, ...]) -> str | None:
    """Why ``featurize = scheme`` cannot feed these inputs, if it cannot."""
    if scheme not in FEATURIZERS:
        return f"must be one of {', '.join(FEATURIZERS)}"
    if len(inputs) != 1:
        return "a featurized model takes exactly one input (the text's features)"
    spec = inputs[0]
    if spec.dtype not in ("float32", "float64", "float16") or len(spec.shape) != 2 or spec.shape[0] is not None \
            or spec.shape[1] is None:
        return (f"input '{spec.name}' must be a float tensor of shape [-1, N] (a batch of rows of N features), not "
                f"{spec.dtype} {[-1 if d is None else d for d in spec.shape]}")
    return None


def featurize(scheme: str, texts: Sequence[str], spec: TensorSpec) -> Any:
    """The input array for ``texts``: one row per text, of the input's declared dtype and width."""
    width = spec.shape[-1]
    if scheme != "hashed-words" or width is None:  # the catalog refuses both (problem() above)
        raise ValueError(f"featurize scheme {scheme!r} cannot feed input {spec.name!r}")
    return hashed_words(texts, width).astype(spec.dtype)
