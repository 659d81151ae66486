"""The rwkv package generating on its own, as ChatRWKV's examples do: the reference the backend must match.

Run as a script (one process per RWKV generation: RWKV-7 is chosen by an environment variable at import):
``python rwkv_reference.py '{"stem": ..., "strategy": ..., "tokenizer": "world" | path, "prompt": ..., "cases":
[{"max_tokens", "temperature", "top_p", "top_k", "seed"}]}'``; prints a JSON list of ``{"text", "tokens"}``.
Sampling is the package's ``PIPELINE.sample_logits`` on numpy's global generator seeded once per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def main(spec: dict) -> list[dict]:
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    import numpy as np
    import torch

    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        from rwkv.utils import PIPELINE

        model = RWKV(spec["stem"], spec["strategy"])
    tokenizer = "rwkv_vocab_v20230424" if spec["tokenizer"] == "world" else spec["tokenizer"]
    pipeline = PIPELINE(model, tokenizer)
    results = []
    for case in spec["cases"]:
        np.random.seed(case["seed"])
        out, state = model.forward(pipeline.encode(spec["prompt"]) or [0], None)
        tokens = []
        while len(tokens) < case["max_tokens"]:
            token = pipeline.sample_logits(out.float(), temperature=case["temperature"], top_p=case["top_p"],
                                           top_k=case["top_k"])
            if token == 0:
                break
            tokens.append(token)
            out, state = model.forward([token], state)
        results.append({"text": pipeline.decode(tokens), "tokens": len(tokens)})
    return results


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
