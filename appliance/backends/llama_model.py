"""A GGUF model in llama.cpp's C API: its weights, its vocabulary, and the context settings ``Llama`` would use.

Both llama.cpp paths ask the same things of a model (tokens of a prompt, text of a token, end-of-generation, the
embedded chat template, the grammar check), so both go through :class:`GgufModel`: the serial path wraps the
``Llama`` object's own model (:meth:`GgufModel.of`), the batched path loads one with no ``Llama`` at all
(:meth:`GgufModel.load`, on the bindings alone: llama_lib.py says why). Tokenisation, detokenisation and every setting
copy llama-cpp-python 0.3.x's ``Llama`` and ``_internals.LlamaModel`` line for line, so a request's tokens and
arithmetic are the same on both paths (tests/integration/test_llama_lean.py compares them field by field).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.backends import llama_lib
from appliance.errors import ModelError

if TYPE_CHECKING:
    from llama_cpp import Llama


@dataclass(frozen=True)
class ContextSettings:
    """What a context is made with: ``Llama``'s own arguments as the worker passes them."""

    n_ctx: int
    n_batch: int
    threads: int
    flash_attention: bool


class GgufModel:
    def __init__(self, model: Any, *, owned: bool, lora: Any = None, lora_scale: float = 1.0) -> None:
        self._lib = llama_lib.bindings()
        self.model = model  # llama_model_p
        self.vocab = self._lib.llama_model_get_vocab(model)
        self.lora, self.lora_scale = lora, lora_scale  # an adapter the contexts made from this model apply
        self._owned = owned

    @classmethod
    def of(cls, llm: Llama) -> GgufModel:
        """The model a ``Llama`` loaded (it stays the Llama's: closing this frees nothing)."""
        return cls(llm.model, owned=False, lora=getattr(llm, "_lora_adapter", None), lora_scale=llm.lora_scale)

    @classmethod
    def load(cls, path: Path, *, mmap: bool, lora: Path | None = None, lora_scale: float = 1.0) -> GgufModel:
        """Load as ``Llama(model_path, use_mmap=mmap, lora_path=lora, lora_scale=...)`` would, without ``Llama``."""
        lib = llama_lib.bindings()
        lib.llama_backend_init()  # idempotent in llama.cpp; Llama calls it once per process
        if not path.exists():
            raise ValueError(f"Model path does not exist: {path}")
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), cls.model_params(mmap=mmap,
                                                                                           lora=lora is not None))
        if not model:
            raise ValueError(f"Failed to load model from file: {path}")
        adapter = None
        if lora is not None:
            adapter = lib.llama_adapter_lora_init(model, str(lora).encode("utf-8"))
            if not adapter:
                lib.llama_model_free(model)
                raise RuntimeError(f"Failed to initialize LoRA adapter from lora path: {lora}")
        return cls(model, owned=True, lora=adapter, lora_scale=lora_scale)

    @staticmethod
    def model_params(*, mmap: bool, lora: bool) -> Any:
        """``Llama.model_params`` for ``use_mmap=mmap`` and a LoRA or none (every other argument at Llama's
        default)."""
        lib = llama_lib.bindings()
        params = lib.llama_model_default_params()
        params.n_gpu_layers, params.split_mode, params.main_gpu = 0, lib.LLAMA_SPLIT_MODE_LAYER, 0
        params.vocab_only = False
        # as Llama: a LoRA is applied to weights read into memory, never to a mapped file
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if mmap and not lora else lib.LLAMA_LOAD_MODE_NONE
        return params

    def close(self) -> None:
        if self._owned and self.model is not None:
            if self.lora is not None:
                self._lib.llama_adapter_lora_free(self.lora)
            self._lib.llama_model_free(self.model)
        self.model = self.vocab = self.lora = None

    # -- what the model is -------------------------------------------------------------------------------------

    @property
    def has_encoder(self) -> bool:
        return bool(self._lib.llama_model_has_encoder(self.model))

    @property
    def is_recurrent(self) -> bool:
        """RWKV, Mamba and hybrids: state that cannot be batched or cut to a prefix in this llama.cpp."""
        return bool(self._lib.llama_model_is_recurrent(self.model) or self._lib.llama_model_is_hybrid(self.model))

    def chat_template(self) -> str | None:
        """The GGUF's ``tokenizer.chat_template``, as ``Llama.metadata`` holds it."""
        key = b"tokenizer.chat_template"
        size = self._lib.llama_model_meta_val_str(self.model, key, None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        self._lib.llama_model_meta_val_str(self.model, key, buffer, size + 1)
        return buffer.value.decode("utf-8")

    # -- tokens ------------------------------------------------------------------------------------------------

    def bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self.vocab))

    def eos(self) -> int:
        return int(self._lib.llama_vocab_eos(self.vocab))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        lib = self._lib
        room = lib.llama_model_n_ctx_train(self.model)
        tokens = (lib.llama_token * room)()
        n = lib.llama_tokenize(self.vocab, text, len(text), tokens, room, add_bos, special)
        if n < 0:  # more tokens than the training context: exactly that many
            room = -n
            tokens = (lib.llama_token * room)()
            n = lib.llama_tokenize(self.vocab, text, len(text), tokens, room, add_bos, special)
            if n < 0:
                raise RuntimeError(f"Failed to tokenize: n_tokens={n}")
        return list(tokens[:n])

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes:
        lib, size = self._lib, 32
        buffer = (ctypes.c_char * size)()
        output = b""
        for token in tokens:
            n = lib.llama_token_to_piece(self.vocab, lib.llama_token(token), buffer, size, 0, special)
            output += buffer.raw[:n]
        # as llama-cpp-python: the space a Llama-1 vocabulary puts before the first word goes, after BOS
        return output[1:] if tokens and tokens[0] == self.bos() and output[:1] == b" " else output

    def token_text(self, token: int) -> str:
        """A special token's own text (BOS, EOS), as a chat template writes it."""
        return self.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""

    def grammar_parses(self, gbnf: str) -> bool:
        """Whether llama.cpp accepts the grammar (llama-cpp-python adds one that fails as a NULL sampler: a crash
        later)."""
        probe = self._lib.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
        if not probe:
            return False
        self._lib.llama_sampler_free(probe)
        return True

    # -- a sequence's cached prefix --------------------------------------------------------------------------------

    def keep_prefix(self, ctx: Any, seq_id: int, cached: list[int], tokens: list[int]) -> int:
        """How many of ``tokens`` start from the KV cells that ``cached`` left in sequence ``seq_id`` of ``ctx``; the
        cells after those are removed. 0 when none can be kept: the caller clears the sequence.

        The last prompt token is always decoded again (its logits start the answer). A sliding-window cache (Gemma 3)
        drops cells far behind the newest it held: when the prefix's own window is gone, nothing is kept, as
        llama-server decides ("forcing full prompt re-processing due to lack of cache data")."""
        common = min(shared_prefix(cached, tokens), len(tokens) - 1)
        return common if common > 0 and self.keep_cells(ctx, seq_id, common) else 0

    def keep_cells(self, ctx: Any, seq_id: int, n: int) -> bool:
        """Keep the first ``n`` cells of sequence ``seq_id`` for what follows them and remove the rest; False (and
        nothing kept for sure) when what follows could not attend to them all (``can_keep``) or llama.cpp cannot cut
        the sequence there."""
        return self.can_keep(ctx, seq_id, n) and bool(
            self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(ctx), seq_id, n, -1))

    def can_keep(self, ctx: Any, seq_id: int, n: int) -> bool:
        """Whether what follows the first ``n`` cells of sequence ``seq_id`` would find every cell it attends to: a
        sliding window's cells more than a window behind the sequence's newest are gone (and with them a prefix
        whose own window they were); an empty sequence has nothing to keep."""
        lib = self._lib
        lowest = int(lib.llama_memory_seq_pos_min(lib.llama_get_memory(ctx), seq_id))
        return 0 <= lowest <= max(0, n - int(lib.llama_model_n_swa(self.model)))

    # -- contexts ----------------------------------------------------------------------------------------------

    def context_params(self, settings: ContextSettings) -> Any:
        """``Llama.context_params`` for these arguments (every other argument at Llama's default)."""
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch = settings.n_ctx, settings.n_batch
        params.n_ubatch = min(settings.n_batch, 512)
        params.n_threads = params.n_threads_batch = settings.threads
        params.rope_scaling_type = lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED
        params.attention_type = lib.LLAMA_ATTENTION_TYPE_UNSPECIFIED
        params.rope_freq_base = params.rope_freq_scale = 0
        params.yarn_ext_factor, params.yarn_attn_factor = -1.0, 1.0
        params.yarn_beta_fast, params.yarn_beta_slow, params.yarn_orig_ctx = 32.0, 1.0, 0
        params.embeddings, params.offload_kqv, params.no_perf = False, True, False
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attention
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        return params

    def apply_lora(self, ctx: Any) -> None:
        """Put this model's LoRA adapter (if any) on a context made from it, at its scale."""
        if self.lora is None:
            return
        lib = self._lib
        adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.lora)
        scales = (ctypes.c_float * 1)(self.lora_scale)
        if lib.llama_set_adapters_lora(ctx, adapters, 1, scales):
            raise ModelError("llama.cpp could not apply the LoRA adapter to the batched context")


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two lists share from their start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
