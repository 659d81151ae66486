"""The pieces of the RWKV backend against the rwkv package itself: vocabularies, sampler, checkpoint reader."""

from __future__ import annotations

import pickle
import random
import zipfile

import numpy as np
import pytest

from appliance.catalog import ModelEntry
from appliance.catalog.pth_meta import engine_strategy, read_checkpoint
from appliance.config.loader import load_config
from appliance.errors import ModelError
from appliance.supervisor import admission
from tests.support import tiny_rwkv

torch = pytest.importorskip("torch")
pytest.importorskip("rwkv")

TEXTS = ["Hello world\n\nUser: hi é 中文 🙂", "  def f(x):\n\treturn x ** 2  # ok", "Ünïcödé ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "",
         "The quick brown fox jumps over the lazy dog. " * 3, "\x00\x01\x7f control", "１２３ fullwidth ｱｲｳ"]


@pytest.fixture(scope="module")
def pile_tokenizer(tmp_path_factory):
    return tiny_rwkv.write_pile_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_world_vocab_encodes_exactly_like_the_packages_tokenizer():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from appliance.backends.rwkv_vocab import WorldVocab, world_vocab_file

    ours, theirs = WorldVocab(), TRIE_TOKENIZER(str(world_vocab_file()))
    rng = random.Random(0)
    texts = TEXTS + [bytes(rng.randrange(256) for _ in range(60)).decode("utf-8", "replace") for _ in range(200)]
    texts += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(40)) for _ in range(200)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert ours.token_bytes(0) == b"" and ours.size == 65530


def test_pile_vocab_bytes_join_to_the_tokenizers_own_decoding(pile_tokenizer):
    from tokenizers import Tokenizer

    from appliance.backends.rwkv_vocab import PileVocab

    ours, theirs = PileVocab(pile_tokenizer), Tokenizer.from_file(str(pile_tokenizer))
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(2, ours.size) for _ in range(rng.randrange(1, 30))]
        assert b"".join(ours.token_bytes(i) for i in ids).decode("utf-8", "replace") == theirs.decode(ids)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text).ids
    assert ours.token_bytes(0) == b"", "<|endoftext|> is special: no text"


def test_sampler_draws_what_the_packages_sampler_draws():
    from rwkv.utils import PIPELINE

    from appliance.backends.sampling import sample_like_chatrwkv

    package = PIPELINE.__new__(PIPELINE)  # sample_logits uses no tokenizer
    generator = torch.Generator().manual_seed(0)
    for case, (temperature, top_p, top_k) in enumerate([(1.0, 0.85, 0), (0.7, 0.5, 20), (1.3, 1.0, 5),
                                                         (0.2, 0.95, 0)]):
        for seed in range(5):
            logits = 3 * torch.randn(1000, generator=generator)
            np.random.seed(seed)
            expected = [package.sample_logits(logits, temperature, top_p, top_k) for _ in range(8)]
            rng = np.random.RandomState(seed)
            got = [sample_like_chatrwkv(logits.numpy(), temperature=temperature, top_p=top_p, top_k=top_k, rng=rng)
                   for _ in range(8)]
            assert got == expected, (case, seed)
    logits = torch.randn(1000, generator=generator)
    greedy = sample_like_chatrwkv(logits.numpy(), temperature=0, top_p=0.5, top_k=3, rng=np.random.RandomState(0))
    assert greedy == int(logits.argmax())


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_checkpoint_reader_sees_what_torch_loads(tmp_path, pile_tokenizer, version):
    path = tiny_rwkv.write(version, tmp_path / "m.pth", tokenizer_json=pile_tokenizer if version == 4 else None)
    checkpoint = read_checkpoint(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert list(checkpoint.tensors) == list(loaded)
    assert {k: t.shape for k, t in checkpoint.tensors.items()} == {k: tuple(v.shape) for k, v in loaded.items()}
    assert all(t.itemsize == 2 for t in checkpoint.tensors.values()), "bf16 storage"
    assert checkpoint.version == version and checkpoint.n_layer == 2 and checkpoint.n_embd == 64
    if version == 4:
        from tokenizers import Tokenizer
        assert checkpoint.n_vocab == Tokenizer.from_file(str(pile_tokenizer)).get_vocab_size()
    else:
        assert checkpoint.n_vocab == 65536
    assert checkpoint.parameters == sum(v.numel() for v in loaded.values())
    fp32 = checkpoint.runtime_bytes("cpu fp32")
    assert checkpoint.runtime_bytes("cpu bf16") == fp32 // 2 + sum(  # ln_x stays fp32
        t.numel * 2 for k, t in checkpoint.tensors.items() if ".ln_x." in k)
    assert checkpoint.runtime_bytes("cpu fp32i8") < fp32


def test_checkpoint_reader_refuses_code_and_other_files(tmp_path):
    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    archive = tmp_path / "evil.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"emb.weight": Exploit()}))
    with pytest.raises(ModelError, match="is not allowed"):
        read_checkpoint(archive)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ModelError, match="not a torch zip checkpoint"):
        read_checkpoint(tmp_path / "text.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not an RWKV checkpoint"):
        read_checkpoint(tmp_path / "other.pth")


def test_memory_estimate_follows_the_strategy(tmp_path):
    path = tiny_rwkv.write(6, tmp_path / "m.pth")
    config = load_config(None, env={})

    def estimate(strategy: str):
        return admission.estimate(ModelEntry(id="m", path=path, sha256=None, backend="rwkv", strategy=strategy),
                                  config)

    fp32, bf16, int8 = estimate("cpu fp32"), estimate("cpu bf16"), estimate("cpu fp32i8")
    assert int8.weights < fp32.weights and bf16.weights < fp32.weights  # (the fp32 embedding dominates i8 here)
    assert int8.compute > fp32.compute, "i8 dequantises the head on every call"
    assert not fp32.mapped and fp32.anonymous == fp32.weights + fp32.kv_cache + fp32.compute
    assert "state" in fp32.describe() and "KV cache" not in fp32.describe()
    assert engine_strategy("cpu fp32i8 *1 -> cpu fp32", 7) == "cpu fp32"
    assert engine_strategy("cpu fp32i8", 6) == "cpu fp32i8"
