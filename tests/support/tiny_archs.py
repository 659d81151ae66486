"""Tiny random-weight GGUF files for many llama.cpp architectures, for tests.

The companion of ``tests/support/tiny_models.py`` (which writes the ``llama`` architecture): same 300-token
SentencePiece-style vocabulary (imported from there, ``tokenizer.ggml.model = "llama"``), F32 weights, 2 layers,
n_embd 64, 4 heads, n_ff 128, context 512. Every architecture's output matrix (or, for architectures that tie it,
the token embedding) has the rows of the control tokens and of every byte outside printable ASCII zeroed, so
greedy decoding only produces printable ASCII and never stops early.

Checked against llama-cpp-python 0.3.36 (its vendored llama.cpp):

* ``ARCHITECTURES``: load with ``llama_cpp.Llama(...)`` and generate with ``create_completion``.
* ``ENCODER_DECODER`` (``t5``): loads, but ``create_completion`` calls only ``llama_decode`` and never
  ``llama_encode``, so llama.cpp hits ``GGML_ASSERT(!cross->seq_ids_enc.empty() && "llama_encode must be called
  first")`` and the process dies with SIGABRT. The appliance's backend drives the encoder itself (llama_encode, then
  decoding), which is how these files generate here.
* ``UNSUPPORTED``: files llama.cpp refuses to load; ``Llama(...)`` raises ``ValueError("Failed to load model from
  file: ...")`` (no crash). The llama.cpp log line (only shown with ``verbose=True``) is the value.

Tensor shapes in the writers below are written in ggml order (``ne0`` first), exactly as in llama.cpp's
``create_tensor(name, {ne0, ne1, ...})`` calls, so they can be compared with ``src/models/<arch>.cpp``; the
numpy array handed to gguf is the reverse.

Which hparams the loader needs (found by dropping each key/tensor in turn):
every architecture needs ``{arch}.context_length``, ``.embedding_length``, ``.block_count`` ("key not found in
model") and, in effect, ``.feed_forward_length`` and ``.attention.head_count`` (without them tensor shapes are
expected with a 0 dimension); plus its norm epsilon, ``.attention.layer_norm_epsilon`` (gptneox falcon mpt bloom
olmo phi2 gpt2 starcoder stablelm) or ``.attention.layer_norm_rms_epsilon`` (chatglm qwen2 baichuan gemma gemma3 t5).
``.attention.head_count_kv`` and ``.rope.dimension_count`` are optional (they default to head_count and the head
size). Per-architecture extras are commented in the writers. ``output.weight`` is optional (tied to token_embd when
absent) for falcon mpt bloom olmo chatglm qwen2 gpt2 starcoder t5, required for gptneox phi2 stablelm baichuan
rwkv6 rwkv7, and must be absent for gemma.

Malformed files do not always fail cleanly: rwkv6 without ``time_mix_lerp_fused`` (and without the separate lerps)
dies on a GGML_ASSERT while loading; t5 without layer 0's ``enc.``/``dec.blk.0.attn_rel_b`` loads but segfaults in
llama_encode / llama_decode (the loader marks it optional).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.support import tiny_models

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
CONTEXT = 512
HEAD_DIM = N_EMBD // N_HEAD
VOCAB_SIZE = tiny_models.VOCAB_SIZE

T5_BUCKETS = 32  # t5.attention.relative_buckets_count

# gguf_writer method -> value; the keys every writer starts from (arch prefix added by gguf)
_HPARAMS = {
    "add_context_length": CONTEXT,
    "add_embedding_length": N_EMBD,
    "add_block_count": N_LAYER,
    "add_feed_forward_length": N_FF,
    "add_head_count": N_HEAD,
    "add_head_count_kv": N_HEAD,
}


def _silenced_rows() -> np.ndarray:
    """Rows of the output matrix to zero: control tokens and bytes outside printable ASCII (as tiny_models)."""
    n = tiny_models.N_SPECIAL
    printable = [n + b for b in range(0x20, 0x7F)] + [n + 0x0A]
    silenced = np.ones(VOCAB_SIZE, dtype=bool)
    silenced[printable] = False
    silenced[n + 256:] = False
    return silenced


class _Builder:
    """A GGUFWriter plus helpers taking ggml-order shapes."""

    def __init__(self, arch: str, path: Path, seed: int):
        import gguf

        self.gguf = gguf
        self.arch = arch
        self.path = path
        self.rng = np.random.default_rng([seed, zlib.crc32(arch.encode())])  # distinct weights per architecture
        self.w = gguf.GGUFWriter(str(path), arch)

    def hparams(self, *, norm: str, rope: bool = True, **overrides: int) -> None:
        """Common hparams and the tokenizer. ``norm``: "layer" (attention.layer_norm_epsilon) or "rms"."""
        w = self.w
        w.add_name(f"tiny-{self.arch}")
        values = dict(_HPARAMS)
        values.update({f"add_{k}": v for k, v in overrides.items()})
        for method, value in values.items():
            getattr(w, method)(value)
        if norm == "rms":
            w.add_layer_norm_rms_eps(1e-5)
        else:
            w.add_layer_norm_eps(1e-5)
        if rope:
            w.add_rope_dimension_count(HEAD_DIM)
        w.add_file_type(self.gguf.LlamaFileType.ALL_F32)
        tokens, scores, types = tiny_models._vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    def rand(self, name: str, *ne: int, scale: float = 0.1) -> None:
        self.w.add_tensor(name, (self.rng.standard_normal(tuple(reversed(ne))) * scale).astype(np.float32))

    def const(self, name: str, value: float, *ne: int) -> None:
        self.w.add_tensor(name, np.full(tuple(reversed(ne)), value, dtype=np.float32))

    def norm(self, prefix: str, *, bias: bool = True, n: int = N_EMBD) -> None:
        self.const(f"{prefix}.weight", 1.0, n)
        if bias:
            self.const(f"{prefix}.bias", 0.0, n)

    def linear(self, prefix: str, n_in: int, n_out: int, *, bias: bool = False) -> None:
        self.rand(f"{prefix}.weight", n_in, n_out)
        if bias:
            self.const(f"{prefix}.bias", 0.0, n_out)

    def vocab_matrix(self, name: str, *, silence: bool) -> None:
        """{n_embd, n_vocab}; ``silence`` zeroes the rows of unprintable tokens (for output / tied embeddings)."""
        arr = self.rng.standard_normal((VOCAB_SIZE, N_EMBD)).astype(np.float32)
        if silence:
            arr[_silenced_rows()] = 0.0
        self.w.add_tensor(name, arr)

    def token_embd(self, *, tied: bool = False) -> None:
        self.vocab_matrix("token_embd.weight", silence=tied)

    def output(self) -> None:
        self.vocab_matrix("output.weight", silence=True)

    def finish(self) -> Path:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        return self.path


def _layers() -> range:
    return range(N_LAYER)


# --- GPT-style: fused qkv {n_embd, 3*n_embd}, LayerNorm with bias ------------------------------------------------

def _gptneox(b: _Builder) -> None:  # Pythia, Dolly v2, OpenAssistant, RedPajama/OpenChatKit
    b.hparams(norm="layer")
    b.w.add_parallel_residual(True)  # gptneox.use_parallel_residual: required
    b.token_embd()
    b.norm("output_norm")
    b.output()
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.linear(p + "attn_qkv", N_EMBD, 3 * N_EMBD, bias=True)
        b.linear(p + "attn_output", N_EMBD, N_EMBD, bias=True)
        b.norm(p + "ffn_norm")
        b.linear(p + "ffn_up", N_EMBD, N_FF, bias=True)
        b.linear(p + "ffn_down", N_FF, N_EMBD, bias=True)


def _falcon(b: _Builder) -> None:  # 7B layout: multi-query attention, parallel attn/ffn, one norm per block
    n_head_kv = 1  # falcon.attention.head_count_kv is required (it sizes attn_qkv)
    b.hparams(norm="layer", head_count_kv=n_head_kv)
    b.token_embd()
    b.norm("output_norm")
    b.output()  # output optional (else tied to token_embd)
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.linear(p + "attn_qkv", N_EMBD, N_EMBD + 2 * n_head_kv * HEAD_DIM)
        b.linear(p + "attn_output", N_EMBD, N_EMBD)
        b.linear(p + "ffn_up", N_EMBD, N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


def _mpt(b: _Builder) -> None:  # ALiBi, no rope; biases optional and omitted (MPT-7B has none)
    b.hparams(norm="layer", rope=False)
    b.w.add_max_alibi_bias(8.0)  # optional, MPT's value
    b.token_embd()
    b.norm("output_norm", bias=False)
    b.output()
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm", bias=False)
        b.linear(p + "attn_qkv", N_EMBD, 3 * N_EMBD)
        b.linear(p + "attn_output", N_EMBD, N_EMBD)
        b.norm(p + "ffn_norm", bias=False)
        b.linear(p + "ffn_up", N_EMBD, N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


def _bloom(b: _Builder) -> None:  # ALiBi, LayerNorm after the embedding
    b.hparams(norm="layer", rope=False)
    b.token_embd()
    b.norm("token_embd_norm")
    b.norm("output_norm")
    b.output()
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.linear(p + "attn_qkv", N_EMBD, 3 * N_EMBD, bias=True)
        b.linear(p + "attn_output", N_EMBD, N_EMBD, bias=True)
        b.norm(p + "ffn_norm")
        b.linear(p + "ffn_up", N_EMBD, N_FF, bias=True)
        b.linear(p + "ffn_down", N_FF, N_EMBD, bias=True)


def _gpt2(b: _Builder) -> None:  # also starcoder: learned positions {n_embd, n_ctx_train}
    b.hparams(norm="layer", rope=False)
    b.token_embd()
    b.rand("position_embd.weight", N_EMBD, CONTEXT)
    b.norm("output_norm")
    b.output()
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.linear(p + "attn_qkv", N_EMBD, 3 * N_EMBD, bias=True)
        b.linear(p + "attn_output", N_EMBD, N_EMBD, bias=True)
        b.norm(p + "ffn_norm")
        b.linear(p + "ffn_up", N_EMBD, N_FF, bias=True)
        b.linear(p + "ffn_down", N_FF, N_EMBD, bias=True)


def _phi2(b: _Builder) -> None:  # parallel attn/ffn sharing attn_norm, output bias
    b.hparams(norm="layer")
    b.token_embd()
    b.norm("output_norm")
    b.output()
    b.const("output.bias", 0.0, VOCAB_SIZE)
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.linear(p + "attn_qkv", N_EMBD, 3 * N_EMBD, bias=True)  # or attn_q/attn_k/attn_v
        b.linear(p + "attn_output", N_EMBD, N_EMBD, bias=True)
        b.linear(p + "ffn_up", N_EMBD, N_FF, bias=True)
        b.linear(p + "ffn_down", N_FF, N_EMBD, bias=True)


def _gptj(b: _Builder) -> None:  # gguf-py's GPT-J layout; llama.cpp names the arch but cannot load it
    b.hparams(norm="layer")
    b.token_embd()
    b.norm("output_norm")
    b.output()
    b.const("output.bias", 0.0, VOCAB_SIZE)
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            b.linear(p + name, N_EMBD, N_EMBD)
        b.linear(p + "ffn_up", N_EMBD, N_FF, bias=True)
        b.linear(p + "ffn_down", N_FF, N_EMBD, bias=True)


# --- llama-style: separate q/k/v, gated FFN ----------------------------------------------------------------------

def _llama_like(b: _Builder, *, norm: str = "rms", qkv_bias: bool = False, tied: bool = False,
                norm_bias: bool = False) -> None:
    b.hparams(norm=norm)
    b.token_embd(tied=tied)
    if not tied:
        b.output()
    b.norm("output_norm", bias=norm_bias)
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm", bias=norm_bias)
        for name in ("attn_q", "attn_k", "attn_v"):
            b.linear(p + name, N_EMBD, N_EMBD, bias=qkv_bias)
        b.linear(p + "attn_output", N_EMBD, N_EMBD)
        b.norm(p + "ffn_norm", bias=norm_bias)
        b.linear(p + "ffn_gate", N_EMBD, N_FF)
        b.linear(p + "ffn_up", N_EMBD, N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


def _qwen2(b: _Builder) -> None:
    _llama_like(b, qkv_bias=True)  # q/k/v biases optional; Qwen2 has them


def _baichuan(b: _Builder) -> None:
    _llama_like(b)  # output.weight required


def _gemma(b: _Builder) -> None:
    _llama_like(b, tied=True)  # no output.weight: llama.cpp ties it to token_embd (an extra tensor is an error)


#: gemma3's sliding window in the tiny file: with 2 layers both use it (llama.cpp makes every 6th layer global), so a
#: prompt a few windows long leaves the cache without its first cells (tests of prefix reuse need that)
GEMMA3_WINDOW = 16


def _gemma3(b: _Builder) -> None:  # Gemma 3 (the shelf's 270M and 1B): sliding-window attention, q/k norms
    b.hparams(norm="rms")
    b.w.add_sliding_window(GEMMA3_WINDOW)
    b.token_embd(tied=True)
    b.norm("output_norm", bias=False)
    for i in _layers():
        p = f"blk.{i}."
        for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            b.norm(p + name, bias=False)
        b.norm(p + "attn_q_norm", bias=False, n=HEAD_DIM)
        b.norm(p + "attn_k_norm", bias=False, n=HEAD_DIM)
        for name in ("attn_q", "attn_k", "attn_v"):
            b.linear(p + name, N_EMBD, N_EMBD)
        b.linear(p + "attn_output", N_EMBD, N_EMBD)
        b.linear(p + "ffn_gate", N_EMBD, N_FF)
        b.linear(p + "ffn_up", N_EMBD, N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


def _stablelm(b: _Builder) -> None:
    _llama_like(b, norm="layer", norm_bias=True)  # LayerNorm with bias; ffn_norm optional (absent in StableLM-2 12B)


def _olmo(b: _Builder) -> None:  # non-parametric LayerNorm: no norm tensors at all
    b.hparams(norm="layer")
    b.token_embd()
    b.output()  # output optional (tied)
    for i in _layers():
        p = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            b.linear(p + name, N_EMBD, N_EMBD)
        b.linear(p + "ffn_gate", N_EMBD, N_FF)
        b.linear(p + "ffn_up", N_EMBD, N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


def _chatglm(b: _Builder) -> None:  # ChatGLM2/3: GQA fused qkv with bias, SwiGLU with fused up+gate {n_embd, 2*n_ff}
    n_head_kv = 2  # chatglm.attention.head_count_kv required (sizes attn_qkv)
    b.hparams(norm="rms", head_count_kv=n_head_kv)
    b.token_embd()
    b.norm("output_norm", bias=False)
    b.output()
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm", bias=False)
        b.linear(p + "attn_qkv", N_EMBD, N_EMBD + 2 * n_head_kv * HEAD_DIM, bias=True)  # bias optional
        b.linear(p + "attn_output", N_EMBD, N_EMBD)
        b.norm(p + "ffn_norm", bias=False)
        b.linear(p + "ffn_up", N_EMBD, 2 * N_FF)
        b.linear(p + "ffn_down", N_FF, N_EMBD)


# --- RWKV (recurrent; src/models/rwkv6.cpp, rwkv7.cpp) ------------------------------------------------------------

def _rwkv_common(b: _Builder) -> None:
    b.hparams(norm="layer", rope=False)
    b.w.add_wkv_head_size(HEAD_DIM)  # {arch}.wkv.head_size: required
    b.w.add_token_shift_count(2)  # optional, the graph asserts it is 2 (the default)
    b.token_embd()
    b.norm("token_embd_norm")
    b.norm("output_norm")
    b.output()


def _rwkv6(b: _Builder) -> None:
    mix, decay = 8, 16
    _rwkv_common(b)
    b.w.add_time_mix_extra_dim(mix)  # required
    b.w.add_time_decay_extra_dim(decay)  # required
    b.w.add_rescale_every_n_layers(0)  # optional
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.norm(p + "attn_norm_2")
        b.rand(p + "time_mix_w1.weight", N_EMBD, mix * 5)
        b.rand(p + "time_mix_w2.weight", mix, N_EMBD, 5)
        b.rand(p + "time_mix_lerp_x.weight", N_EMBD, 1, 1)
        b.rand(p + "time_mix_lerp_fused.weight", N_EMBD, 1, 1, 5)  # or the five lerp_{w,k,v,r,g}
        b.rand(p + "time_mix_first.weight", HEAD_DIM, N_EMBD // HEAD_DIM)
        b.rand(p + "time_mix_decay.weight", N_EMBD)
        b.rand(p + "time_mix_decay_w1.weight", N_EMBD, decay)
        b.rand(p + "time_mix_decay_w2.weight", decay, N_EMBD)
        for name in ("key", "value", "receptance", "gate", "output"):
            b.rand(p + f"time_mix_{name}.weight", N_EMBD, N_EMBD)
        b.norm(p + "time_mix_ln")
        b.rand(p + "channel_mix_lerp_k.weight", N_EMBD, 1, 1)
        b.rand(p + "channel_mix_lerp_r.weight", N_EMBD, 1, 1)
        b.rand(p + "channel_mix_key.weight", N_EMBD, N_FF)
        b.rand(p + "channel_mix_value.weight", N_FF, N_EMBD)
        b.rand(p + "channel_mix_receptance.weight", N_EMBD, N_EMBD)


def _rwkv7(b: _Builder) -> None:
    decay, iclr, value_mix, gate = 8, 8, 8, 16
    _rwkv_common(b)
    b.w.add_decay_lora_rank(decay)  # required
    b.w.add_iclr_lora_rank(iclr)  # required
    b.w.add_value_residual_mix_lora_rank(value_mix)  # required
    b.w.add_gate_lora_rank(gate)  # optional key, but it sizes time_mix_g1/g2
    for i in _layers():
        p = f"blk.{i}."
        b.norm(p + "attn_norm")
        b.norm(p + "attn_norm_2")
        v_rank = iclr if i == 0 else value_mix  # layer 0's v1/v2 use the iclr rank
        for name, rank in (("w", decay), ("a", iclr), ("v", v_rank)):
            b.rand(p + f"time_mix_{name}0.weight", N_EMBD)
            b.rand(p + f"time_mix_{name}1.weight", N_EMBD, rank)
            b.rand(p + f"time_mix_{name}2.weight", rank, N_EMBD)
        b.rand(p + "time_mix_g1.weight", N_EMBD, gate)
        b.rand(p + "time_mix_g2.weight", gate, N_EMBD)
        b.rand(p + "time_mix_lerp_fused.weight", N_EMBD, 1, 1, 6)
        for name in ("k_k", "k_a", "r_k"):
            b.rand(p + f"time_mix_{name}.weight", N_EMBD)
        for name in ("key", "value", "receptance", "output"):
            b.rand(p + f"time_mix_{name}.weight", N_EMBD, N_EMBD)
        b.norm(p + "time_mix_ln")
        b.rand(p + "channel_mix_lerp_k.weight", N_EMBD, 1, 1)
        b.rand(p + "channel_mix_key.weight", N_EMBD, N_FF)
        b.rand(p + "channel_mix_value.weight", N_FF, N_EMBD)


# --- T5 / Flan-T5 (encoder-decoder) -------------------------------------------------------------------------------

def _t5(b: _Builder) -> None:
    b.hparams(norm="rms", rope=False)
    b.w.add_relative_attn_buckets_count(T5_BUCKETS)  # required
    b.w.add_decoder_start_token_id(0)  # optional; T5 starts decoding from <pad>, here <unk> (id 0)
    b.token_embd()
    b.output()  # output optional (tied)
    b.norm("enc.output_norm", bias=False)
    b.norm("dec.output_norm", bias=False)
    for side in ("enc", "dec"):
        for i in _layers():
            p = f"{side}.blk.{i}."
            b.norm(p + "attn_norm", bias=False)
            if i == 0:  # relative position bias lives in layer 0 only (as in HF); later layers reuse it
                b.rand(p + "attn_rel_b.weight", N_HEAD, T5_BUCKETS)
            for name in ("attn_q", "attn_k", "attn_v", "attn_o"):
                b.linear(p + name, N_EMBD, N_EMBD)
            if side == "dec":
                b.norm(p + "cross_attn_norm", bias=False)
                for name in ("cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o"):
                    b.linear(p + name, N_EMBD, N_EMBD)
            b.norm(p + "ffn_norm", bias=False)
            b.linear(p + "ffn_gate", N_EMBD, N_FF)  # present: Flan-T5's gated GELU (absent: T5's ReLU)
            b.linear(p + "ffn_up", N_EMBD, N_FF)
            b.linear(p + "ffn_down", N_FF, N_EMBD)


_WRITERS: dict[str, Callable[[_Builder], None]] = {
    "gptneox": _gptneox,
    "falcon": _falcon,
    "mpt": _mpt,
    "bloom": _bloom,
    "olmo": _olmo,
    "chatglm": _chatglm,
    "rwkv6": _rwkv6,
    "rwkv7": _rwkv7,
    "qwen2": _qwen2,
    "phi2": _phi2,
    "gpt2": _gpt2,
    "starcoder": _gpt2,
    "stablelm": _stablelm,
    "baichuan": _baichuan,
    "gemma": _gemma,
    "gemma3": _gemma3,
    "t5": _t5,
    "gptj": _gptj,
    "opt": _gpt2,  # any layout: llama.cpp rejects the architecture name before looking at tensors
}

ARCHITECTURES: list[str] = ["gptneox", "falcon", "mpt", "bloom", "olmo", "chatglm", "rwkv6", "rwkv7", "qwen2",
                            "phi2", "gpt2", "starcoder", "stablelm", "baichuan", "gemma", "gemma3"]
ENCODER_DECODER: list[str] = ["t5"]
UNSUPPORTED: dict[str, str] = {  # arch -> llama.cpp's log line; Llama() raises ValueError
    "gptj": "llama_model_load: error loading model: unsupported model architecture: 'gptj'",
    "opt": "llama_model_load: error loading model: unknown model architecture: 'opt'",
}


def write(arch: str, path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` GGUF (F32) to ``path`` and return it.

    ``arch`` is one of ``ARCHITECTURES`` (load and generate), ``ENCODER_DECODER`` or ``UNSUPPORTED``.
    """
    if arch not in _WRITERS:
        raise ValueError(f"no tiny writer for architecture {arch!r}; known: {sorted(_WRITERS)}")
    builder = _Builder(arch, Path(path), seed)
    _WRITERS[arch](builder)
    return builder.finish()
