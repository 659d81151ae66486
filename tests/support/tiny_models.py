"""Tiny but real models for the tests: GGUF files written with the ``gguf`` package, random weights.

The llama-architecture model has a 300-token SentencePiece-style vocabulary (3 control tokens, the 256 byte tokens
and 41 ASCII pieces). The output rows of the control tokens and of every byte outside printable ASCII are zero, so
greedy decoding only ever produces printable ASCII and never ends early: outputs are deterministic, readable in a
failure message, and as long as ``max_tokens`` asks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PIECES = ["▁", "▁the", "▁a", "e", "t", "a", "o", "i", "n", "s", "r", "h", "l", "d", "c", "u", "m", "▁of", "▁and",
          "▁to", "▁in", "▁is", "er", "th", "he", "in", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te",
          "ed", "is", "it", "al", "ar"]
N_SPECIAL = 3  # <unk>, <s>, </s>
VOCAB_SIZE = N_SPECIAL + 256 + len(PIECES)

# gguf token types
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0] * (N_SPECIAL + 256) + [-float(i) for i in range(len(PIECES))]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256 + [_NORMAL] * len(PIECES)
    return tokens, scores, types


#: a small Jinja chat template for tiny GGUFs that embed one (the shape of many real templates, in few tokens)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_llama(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
                n_ff: int = 128, context: int = 512, seed: int = 0, chat_template: str | None = None,
                name: str = "tiny-llama", favour: str | None = None, add_bos: bool = True) -> Path:
    """Write a random llama-architecture GGUF (F32) and return its path. ``favour`` (one ASCII character) makes the
    model pick that character wherever a grammar allows it: a model that "wants" to open a tool call with ``<``.
    ``add_bos=False``: a vocabulary that starts no prompt with BOS (SmolLM2's), so "" is no token at all."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    tokens, scores, types = _vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    output = normal(VOCAB_SIZE, n_embd, scale=1.0)
    printable = [N_SPECIAL + b for b in range(0x20, 0x7F)] + [N_SPECIAL + 0x0A]
    silenced = np.ones(VOCAB_SIZE, dtype=bool)
    silenced[printable] = False
    silenced[N_SPECIAL + 256:] = False
    output[silenced] = 0.0

    embeddings = normal(VOCAB_SIZE, n_embd, scale=1.0)
    if favour is not None:
        # a large constant in dimension 0 of every embedding survives to the last norm as a nearly constant
        # feature; output column 0 then works as a bias that only the favoured character's row reads
        embeddings[:, 0] += 50.0
        output[:, 0] = 0.0
        output[N_SPECIAL + ord(favour), 0] = 3.0
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", normal(n_embd, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.attn_k.weight", normal(n_head_kv * head_dim, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.attn_v.weight", normal(n_head_kv * head_dim, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.attn_output.weight", normal(n_embd, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", normal(n_ff, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", normal(n_ff, n_embd, scale=0.1))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", normal(n_embd, n_ff, scale=0.1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


QUANT_TYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}  # llama_ftype values


def quantize(source: Path, target: Path, kind: str = "q4_0") -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return target


def write_lora(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
               rank: int = 4, alpha: float = 8.0, seed: int = 7) -> Path:
    """A LoRA adapter GGUF for :func:`write_llama`'s model (same sizes), in the layout llama.cpp's
    ``llama_adapter_lora_init`` reads: ``<tensor>.lora_a`` is (rank x in), ``.lora_b`` is (out x rank)."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for i in range(n_layer):
        for target, out in (("attn_q", n_embd), ("attn_v", n_head_kv * head_dim)):
            writer.add_tensor(f"blk.{i}.{target}.weight.lora_a",
                              (rng.standard_normal((rank, n_embd)) * 0.5).astype(np.float32))
            writer.add_tensor(f"blk.{i}.{target}.weight.lora_b",
                              (rng.standard_normal((out, rank)) * 0.5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def catalog_entry(model_id: str, path: Path, *, absolute: bool = False, **extra) -> str:
    """A ``[[models]]`` table for a model file the tests wrote (its digest and size computed); ``absolute`` for a
    catalog kept in another directory than the model."""
    from appliance.catalog import sha256_file
    lines = ["[[models]]", f'id = "{model_id}"', f'file = "{path if absolute else path.name}"',
             f'sha256 = "{extra.pop("sha256", None) or sha256_file(path)}"', f"size = {path.stat().st_size}",
             'family = "test"', 'licence = "none (random weights)"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]  # JSON's strings, numbers, booleans are TOML's
    return "\n".join(lines) + "\n"


#: A chat template in the shape of Qwen2.5-Instruct's (Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json): the tools
#: are listed as JSON in the system turn, calls are ``<tool_call>`` blocks and tool results ``<tool_response>`` blocks
#: in a user turn. A model written with it is one the appliance offers tools to (appliance/tools.py).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system{{ '\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}{{ '\\n\\n# Tools\\n\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n</tools>\\n\\n' }}"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
    " XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
    "<|im_end|>{{ '\\n' }}"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system{{ '\\n' + messages[0]['content'] }}<|im_end|>"
    "{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role + '\\n' + message.content }}<|im_end|>{{ '\\n' }}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant"
    "{% if message.content %}{{ '\\n' + message.content }}{% endif %}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    "{{ '\\n<tool_call>\\n' }}{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}"
    "{{ '\\n</tool_call>' }}{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}")
