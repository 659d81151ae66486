"""Encoder-decoder GGUFs (T5, Flan-T5) through llama.cpp's C API.

llama-cpp-python's generate() only ever decodes, and llama.cpp aborts the process when a decoder runs before its
encoder (GGML_ASSERT "llama_encode must be called first"). Here the prompt goes through ``llama_encode`` once,
then the decoder runs from its start token, one token at a time. Sampling is done on the logits with numpy, with the
same knobs as the decoder-only path (temperature, top_k, top_p, repeat penalty, seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from appliance.backends.sampling import penalise_repeats
from appliance.errors import ModelError
from appliance.protocol import SamplingParams

if TYPE_CHECKING:
    from llama_cpp import Llama


def pick(logits: np.ndarray, params: SamplingParams, recent: list[int], rng: np.random.Generator) -> int:
    logits = logits.astype(np.float64)
    penalise_repeats(logits, recent, params.repeat_penalty)
    if params.sampling_temperature == 0:
        return int(np.argmax(logits))
    order = np.argsort(logits)[::-1]
    if params.top_k > 0:
        order = order[:params.top_k]
    scaled = logits[order] / params.sampling_temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.sampling_top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.sampling_top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(order, p=probs))


def tokens(llm: Llama, prompt_tokens: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
    """Encode the prompt, then yield decoded tokens until the caller stops asking."""
    import llama_cpp

    ctx, model = llm.ctx, llm.model
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    llm.reset()  # type: ignore[no-untyped-call]
    batch = (llama_cpp.llama_token * len(prompt_tokens))(*prompt_tokens)
    if llama_cpp.llama_encode(ctx, llama_cpp.llama_batch_get_one(batch, len(prompt_tokens))) != 0:
        raise ModelError("llama.cpp could not run the encoder on this prompt")
    token = llama_cpp.llama_model_decoder_start_token(model)
    if token < 0:
        token = llm.token_bos()
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(seed)
    recent: list[int] = []
    while True:
        one = (llama_cpp.llama_token * 1)(token)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
            raise ModelError("llama.cpp could not run the decoder")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        token = pick(logits, params, recent, rng)
        recent.append(token)
        yield token
