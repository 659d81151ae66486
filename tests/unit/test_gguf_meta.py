"""GGUF header reading without the engine, and the memory estimate built on it."""

from __future__ import annotations

import pytest

from appliance.backends.probe import MiB
from appliance.catalog import Catalog
from appliance.catalog.gguf_meta import Architecture, ArrayInfo, read_metadata
from appliance.config import load_config
from appliance.errors import InsufficientMemory, ModelError
from appliance.supervisor import admission
from tests.support import tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    return tiny_models.write_llama(path, n_embd=128, n_layer=3, n_head=8, n_head_kv=2, n_ff=256, context=1024,
                                   chat_template="{{ messages }}")


def test_metadata_and_architecture(tiny):
    meta = read_metadata(tiny)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.chat_template"] == "{{ messages }}"
    assert isinstance(meta["tokenizer.ggml.tokens"], ArrayInfo)
    assert meta["tokenizer.ggml.tokens"].length == tiny_models.VOCAB_SIZE
    arch = Architecture.from_metadata(meta, tiny)
    assert (arch.n_layer, arch.n_embd, arch.n_head, arch.n_head_kv, arch.head_dim_k, arch.n_ff, arch.n_vocab,
            arch.context_train) == (3, 128, 8, 2, 16, 256, tiny_models.VOCAB_SIZE, 1024)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_metadata(bad)
    bad.write_bytes(b"GGUF\x03\0\0\0" + b"\x01")
    with pytest.raises(ModelError, match="damaged GGUF header"):
        read_metadata(bad)


def test_estimate_and_check(tiny):
    config = load_config(None, env={"APPLIANCE_WORKER_CONTEXT_SIZE": "1024", "APPLIANCE_WORKER_BATCH_SIZE": "64",
                                    "APPLIANCE_WORKER_DEFAULT_MAX_TOKENS": "64", "APPLIANCE_MEMORY_MARGIN_MIB": "10"})
    entry = Catalog.single_file(tiny).get("m")
    footprint = admission.estimate(entry, config)
    assert footprint.weights == tiny.stat().st_size
    assert footprint.kv_cache == 3 * 1024 * 2 * (16 + 16) * 2  # layers x context x KV heads x (k + v dims) x f16
    assert footprint.compute == ((1024 * 64 * 8 * 4) + 64 * (8 * 128 + 3 * 256) * 4 + tiny_models.VOCAB_SIZE * 4
                                 + tiny_models.VOCAB_SIZE * (4 * 1 + 20))  # a slot's kept prompt-end logits
    assert footprint.margin == 10 * MiB
    admission.check(footprint, footprint.total, budget_set=False)
    with pytest.raises(InsufficientMemory) as err:
        admission.check(footprint, footprint.total - 1, budget_set=True)
    assert f"needs about {footprint.total / MiB:.0f} MiB" in err.value.message
    assert "(memory.budget_mib)" in err.value.message and err.value.code == "memory"


def test_the_estimate_counts_the_kv_cache_of_every_slot(tiny):
    config = load_config(None, env={"APPLIANCE_WORKER_CONTEXT_SIZE": "1024", "APPLIANCE_WORKER_BATCH_SIZE": "64",
                                    "APPLIANCE_WORKER_PARALLEL": "4"})
    entry = Catalog.single_file(tiny).get("m")
    one, four = admission.estimate(entry, config, slots=1), admission.estimate(entry, config)
    per_token = 3 * 2 * (16 + 16) * 2  # layers x KV heads x (k + v dims) x f16
    assert one.kv_cache == 1024 * per_token
    # four slots of 1024 tokens (the Llama object's own 256-token context is freed before the batch's is made)
    assert four.kv_cache == 4 * 1024 * per_token
    assert four.compute > one.compute and four.total > one.total
