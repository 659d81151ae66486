"""Choosing the next token from logits, for the backends that sample themselves (T5 and RWKV).

:func:`sample_like_chatrwkv` is the rwkv package's ``PIPELINE.sample_logits``, the sampler RWKV users know:
softmax, keep the nucleus (``top_p``), then ``top_k``, and only then apply the temperature. The arithmetic is the
same, with two changes: a per-request ``numpy.random.RandomState`` instead of numpy's global generator (two requests
never share a random stream, and a seed reproduces an answer), and a true argmax at temperature 0 (the package
still draws a random number there). A test compares it with the package, draw for draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REPEAT_WINDOW = 64  # tokens a repeat penalty looks back over: llama.cpp's default penalty_last_n


def penalise_repeats(logits: np.ndarray, recent: Sequence[int], penalty: float) -> None:
    """llama.cpp's repeat penalty, in place: each recent token's logit is divided (if positive) or multiplied."""
    if penalty == 1.0 or not recent:
        return
    seen = np.array(sorted(set(recent[-REPEAT_WINDOW:])))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)


def sample_like_chatrwkv(logits: np.ndarray, *, temperature: float, top_p: float, top_k: int,
                         rng: np.random.RandomState) -> int:
    import torch  # the softmax is torch's, as in the package, so the probabilities match bit for bit

    if temperature <= 0:
        return int(np.argmax(logits))
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    order = np.argsort(probs)
    descending = probs[order][::-1]
    cutoff = float(descending[np.argmax(np.cumsum(descending) >= top_p)])
    probs[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        probs[order[:-top_k]] = 0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    probs = probs / np.sum(probs)
    return int(rng.choice(a=len(probs), p=probs))
