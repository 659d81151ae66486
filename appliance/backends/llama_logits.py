"""The logits at the end of a sequence's prompt, kept so that the same prompt again samples without decoding.

A ``Llama`` asked the prompt it has just evaluated samples from the logits still in its context, with no decode (after
a generation it decodes the prompt's last token again); a batch's context holds the logits of its last step only
(another sequence's, or a later token's, by the time the prompt comes again).
So each sequence keeps a copy of the logits its prompt ended with (``n_vocab`` floats: 192 KiB for SmolLM2, 1 MiB
for Gemma 3), and a repeated prompt is sampled from the copy the way ``llama_sampler_sample`` samples from a
context: every token with its logit and p = 0, the chain applied, the selected token accepted. The copies are plain
memory moves (strided ones through memoryview), no numpy.
"""

from __future__ import annotations

import array
import ctypes
from typing import Any


class PromptEndLogits:
    def __init__(self, lib: Any, n_vocab: int, slots: int) -> None:
        self._lib, self._n = lib, n_vocab
        self._saved = [(ctypes.c_float * n_vocab)() for _ in range(slots)]  # per sequence id
        self._candidates = (lib.llama_token_data * n_vocab)()
        raw = memoryview(self._candidates).cast("B")
        self._ids, self._floats = raw.cast("i"), raw.cast("f")  # a llama_token_data is (int32 id, float logit, p)
        self._all_ids = memoryview(array.array("i", range(n_vocab)))
        self._zeros = memoryview(array.array("f", bytes(4 * n_vocab)))

    def save(self, ctx: Any, seq_id: int, output: int) -> None:
        """Copy the logits of output ``output`` of the last decode (a prompt's last token) for ``seq_id``."""
        ctypes.memmove(self._saved[seq_id], self._lib.llama_get_logits_ith(ctx, output), 4 * self._n)

    def sample(self, seq_id: int, sampler: Any) -> int:
        """``llama_sampler_sample`` on the copy kept for ``seq_id``."""
        lib = self._lib
        self._ids[0::3] = self._all_ids  # a sampler sorts and shrinks the array it is given: rebuilt every time
        self._floats[1::3] = memoryview(self._saved[seq_id]).cast("B").cast("f")
        self._floats[2::3] = self._zeros
        chosen = lib.llama_token_data_array(self._candidates, self._n, -1, False)
        lib.llama_sampler_apply(sampler, ctypes.byref(chosen))
        if not 0 <= chosen.selected < chosen.size:
            raise RuntimeError("the sampler chain selected no token")
        token = int(chosen.data[chosen.selected].id)
        lib.llama_sampler_accept(sampler, token)
        return token
