"""Tiny random RWKV checkpoints in the real layout of BlinkDL's ``.pth`` files, and a tiny Raven-style tokenizer.

Keys, shapes and key order follow RWKV-LM's training code (``emb``, then per block ``ln1``, ``ln2``, ``ln0``,
``att.*``, ``ffn.*``, then ``ln_out`` and ``head``; ``nn.Linear`` weights are ``[out, in]``) and the files are
written with ``torch.save`` in bf16 like the released ones, so ``rwkv.model.RWKV`` loads them as it loads a real
model: v4 (Raven, Pile vocabulary), v5.2 and v6 (World) and v7 (World, through the package's RWKV-7 class).

Random weights would produce any token, including ids with no text or half a UTF-8 character. So ``ln_out`` is
constant (weight 1, bias 1): the layer-normed state has zero mean, a head row ``h`` scores ``h.x + sum(h)``, and
rows of tokens that are not printable text are set near -1 (score about ``-n_embd``) while the others have zero
mean (scores about +-10). Greedy and sampled output is then always readable text, and never ends early.
"""

from __future__ import annotations

import ast
import functools
import math
from pathlib import Path

WORLD_VOCAB = 65536  # World ids 1..65529 have text; 0 ends a document
N = 64  # head size of every released RWKV-5/6/7


def _nice(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in " \n" for c in text)


@functools.lru_cache(maxsize=1)
def printable_world_ids() -> frozenset[int]:
    from appliance.backends.rwkv_vocab import world_vocab_file
    good = set()
    for line in world_vocab_file().read_text(encoding="utf-8").splitlines():
        token = ast.literal_eval(line[line.index(" ") + 1:line.rindex(" ")])
        data = token.encode() if isinstance(token, str) else token
        try:
            if _nice(data.decode("utf-8")):
                good.add(int(line[:line.index(" ")]))
        except UnicodeDecodeError:
            pass
    return good


def printable_ids(tokenizer_json: Path) -> set[int]:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return {i for i in range(tokenizer.get_vocab_size()) if _nice(tokenizer.decode([i]))}


def write_pile_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE ``tokenizer.json`` laid out like Raven's 20B_tokenizer.json (0 = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Bob: What is the weather like today?\n\nAlice: It is sunny and warm, with a light breeze.",
              "The quick brown fox jumps over the lazy dog. Sensors report temperature and humidity.",
              "Raven is an RWKV language model fine-tuned on instructions and chat."] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path))
    return path


def layout(version: int, *, n_layer: int, n_embd: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Ordered ``{key: shape}`` of a real checkpoint (version 5 is 5.2, the RWKV-5 World layout)."""
    c, v = n_embd, vocab_size
    h = c // N
    ffn = 4 * c if version in (4, 7) else int((c * 3.5) // 32 * 32)
    lora = 32  # the low-rank sizes of v6/v7 at this width

    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (v, c)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for norm in ("ln1", "ln2") + (("ln0",) if i == 0 else ()):
            shapes[f"{b}{norm}.weight"] = shapes[f"{b}{norm}.bias"] = (c,)
        att, ffn_ = b + "att.", b + "ffn."
        if version == 4:
            shapes |= {att + "time_decay": (c,), att + "time_first": (c,)}
            shapes |= {f"{att}time_mix_{m}": (1, 1, c) for m in "kvr"}
        elif version == 5:
            shapes |= {f"{att}time_mix_{m}": (1, 1, c) for m in "kvrg"}
            shapes |= {att + "time_decay": (h, N), att + "time_faaaa": (h, N)}
        elif version == 6:
            shapes |= {f"{att}time_maa_{m}": (1, 1, c) for m in "xwkvrg"}
            shapes |= {att + "time_maa_w1": (c, lora * 5), att + "time_maa_w2": (5, lora, c),
                       att + "time_decay": (1, 1, c), att + "time_decay_w1": (c, 64), att + "time_decay_w2": (64, c),
                       att + "time_faaaa": (h, N)}
        else:
            shapes |= {f"{att}x_{m}": (1, 1, c) for m in "rwkvag"}
            low_rank = ("w", "a", "v", "g") if i else ("w", "a", "g")  # layer 0 has no v0/v1/v2
            for m in low_rank:
                if m != "g":
                    shapes[f"{att}{m}0"] = (1, 1, c)
                shapes |= {f"{att}{m}1": (c, lora), f"{att}{m}2": (lora, c)}
            shapes |= {att + "k_k": (1, 1, c), att + "k_a": (1, 1, c), att + "r_k": (h, N)}
        shapes |= {att + "receptance.weight": (c, c), att + "key.weight": (c, c), att + "value.weight": (c, c),
                   att + "output.weight": (c, c)}
        if version in (5, 6):
            shapes[att + "gate.weight"] = (c, c)
        if version != 4:
            shapes[att + "ln_x.weight"] = shapes[att + "ln_x.bias"] = (c,)
        if version == 4 or version == 5:
            shapes |= {f"{ffn_}time_mix_{m}": (1, 1, c) for m in "kr"}
        elif version == 6:
            shapes |= {ffn_ + "time_maa_k": (1, 1, c), ffn_ + "time_maa_r": (1, 1, c)}
        else:
            shapes[ffn_ + "x_k"] = (1, 1, c)
        shapes[ffn_ + "key.weight"] = (ffn, c)
        if version != 7:
            shapes[ffn_ + "receptance.weight"] = (c, c)
        shapes[ffn_ + "value.weight"] = (c, ffn)
    shapes["ln_out.weight"] = shapes["ln_out.bias"] = (c,)
    shapes["head.weight"] = (v, c)
    return shapes


def _initial(key: str, shape: tuple[int, ...], version: int, generator):
    """Values in the ranges trained models have, so the recurrence stays finite and outputs vary with input."""
    import torch

    def uniform():
        return torch.rand(*shape, generator=generator)

    def normal(scale: float):
        return scale * torch.randn(*shape, generator=generator)

    name = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else key.rsplit(".", 2)[-2]
    if key.endswith(("ln0.weight", "ln_out.weight", "ln_out.bias")):
        return torch.ones(shape)  # ln_out constant: see the module docstring
    if key.endswith("ln0.bias"):
        return torch.zeros(shape)
    if name in ("ln1", "ln2", "ln_x"):
        return 1.0 + normal(0.1) if key.endswith(".weight") else normal(0.05)
    if name.startswith(("time_mix_", "x_")) or (name.startswith("time_maa_") and not name.endswith(("w1", "w2"))):
        return uniform()
    if name.endswith(("w1", "w2")) or name in ("a1", "a2", "v1", "v2", "g1", "g2"):
        return normal(0.1)
    if name == "time_decay":
        return -5.0 + 6.0 * uniform() if version == 4 else -6.0 + 5.5 * uniform()
    if name in ("time_first", "time_faaaa"):
        return (math.log(0.3) if version == 4 else 0.0) + normal(0.5)
    if name == "w0":
        return -6.0 + 5.0 * uniform()
    if name in ("a0", "v0"):
        return normal(0.5)
    if name in ("k_k", "k_a"):
        return (0.85 if name == "k_k" else 1.0) + normal(0.05)
    if name == "r_k":
        return normal(0.1)
    if key == "emb.weight":
        return normal(1.0)
    scale = 1.0 / math.sqrt(shape[1]) * (0.5 if key.endswith(("att.output.weight", "ffn.value.weight")) else 1.0)
    return normal(scale)


def _head(vocab_size: int, n_embd: int, printable: set[int] | frozenset[int], generator):
    import torch

    head = 0.5 * torch.randn(vocab_size, n_embd, generator=generator)
    head -= head.mean(dim=1, keepdim=True)
    silent = torch.ones(vocab_size, dtype=torch.bool)
    silent[sorted(i for i in printable if i < vocab_size)] = False
    # a little noise keeps every int8 column's range non-zero under the "i8" strategies
    head[silent] = -1.0 + 0.01 * torch.randn(int(silent.sum()), n_embd, generator=generator)
    return head


def write(version: int, path: Path, *, n_layer: int = 2, n_embd: int = 64, seed: int = 0,
          tokenizer_json: Path | None = None, vocab_size: int | None = None) -> Path:
    """Write a random RWKV-``version`` (4, 5, 6 or 7) checkpoint to ``path`` (a ``.pth``) and return it.

    The vocabulary is ``tokenizer_json``'s, else ``vocab_size`` ids (all but 0 and 1 "printable"), else World's.
    """
    import torch

    if tokenizer_json is not None:
        from tokenizers import Tokenizer
        vocab_size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
        printable = printable_ids(tokenizer_json)
    elif vocab_size is not None:
        printable = set(range(2, vocab_size))
    else:
        vocab_size, printable = WORLD_VOCAB, printable_world_ids()
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in layout(version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size).items():
        value = (_head(vocab_size, n_embd, printable, generator) if key == "head.weight"
                 else _initial(key, shape, version, generator))
        weights[key] = value.reshape(shape).to(torch.bfloat16).contiguous()
    torch.save(weights, path)
    return path
