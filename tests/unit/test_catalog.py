"""The model catalog: parsing, helpful errors, digest checks."""

from __future__ import annotations

import hashlib

import pytest

from appliance.catalog import Catalog, verify
from appliance.errors import ChecksumMismatch, ConfigError, ModelError, UnknownModel


def test_load_resolves_relative_files(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "m"\nfile = "m.gguf"\nsha256 = "{digest.upper()}"\nsize = 64\nfamily = "llama"\n'
        f'template = "alpaca"\nlicence = "MIT"\n')
    catalog = Catalog.load(tmp_path / "catalog.toml")
    entry = catalog.get("m")
    assert entry.path == model and entry.sha256 == digest and entry.backend == "llama_cpp"
    verify(entry)
    with pytest.raises(UnknownModel, match="available: m"):
        catalog.get("other")


def test_catalog_errors_name_entry_and_key(tmp_path):
    (tmp_path / "catalog.toml").write_text(
        '[[models]]\nid = "a"\nfile = "a.gguf"\nsha256 = "xyz"\ntemplate = "nope"\n\n'
        '[[models]]\nfile = "b.bin"\nsha256 = 5\ncolour = "red"\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    text = "\n".join(err.value.problems)
    assert "catalog.toml: models[0].sha256 = 'xyz': must be 64 hex characters" in text
    assert "models[0].template = 'nope': unknown template" in text
    assert "models[1].colour: unknown key" in text
    assert "models[1].id: missing" in text
    assert "models[1].sha256 = 5: must be a string" in text


def test_a_model_id_is_matched_whole(tmp_path):
    """Ids become MQTT topic levels (`.../infer/<id>`): a trailing newline is not part of a name."""
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "m\\n"\nfile = "m.gguf"\nsha256 = "{"a" * 64}\\n"\nfamily = "llama"\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    assert [p.split(" = ")[0] for p in err.value.problems] == ["catalog.toml: models[0].id",
                                                               "catalog.toml: models[0].sha256"]


def test_a_release_name_is_matched_whole(tmp_path):
    """A release becomes a directory under /opt/appliance/releases, created by root."""
    from appliance.release.verify import FORMAT, BundleError, _metadata
    (tmp_path / "bundle.toml").write_text(f'format = {FORMAT}\nrelease = "0.1.0\\n"\nversion = "0.1.0"\n'
                                          f'arch = "arm64"\nrequirement = "appliance"\n')
    with pytest.raises(BundleError, match="not a safe directory name"):
        _metadata(tmp_path)


def test_digest_mismatch_names_file_and_both_digests(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"abc")
    (tmp_path / "catalog.toml").write_text(f'[[models]]\nid = "m"\nfile = "m.gguf"\nsha256 = "{"1" * 64}"\n')
    with pytest.raises(ChecksumMismatch) as err:
        verify(Catalog.load(tmp_path / "catalog.toml").get("m"))
    assert str(model) in err.value.message and "1" * 64 in err.value.message
    assert hashlib.sha256(b"abc").hexdigest() in err.value.message
    model.unlink()
    with pytest.raises(ModelError, match="not found"):
        verify(Catalog.load(tmp_path / "catalog.toml").get("m"))


def test_single_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Catalog.single_file(tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="unsupported file type"):
        Catalog.single_file(tmp_path / "x.bin")


def test_rwkv_keys_are_checked(tmp_path):
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "a"\nfile = "a.pth"\nsha256 = "{"0" * 64}"\nstrategy = "cuda fp16"\n\n'
        f'[[models]]\nid = "b"\nfile = "b.gguf"\nsha256 = "{"0" * 64}"\nstrategy = "cpu fp32"\ntokenizer = "t.json"\n\n'
        f'[[models]]\nid = "c"\nfile = "c.pth"\nsha256 = "{"0" * 64}"\nstrategy = "cpu fp32i8 *10 -> cpu fp32"\n'
        f'tokenizer = "20B_tokenizer.json"\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    text = "\n".join(err.value.problems)
    assert "models[0].strategy = 'cuda fp16': must be an rwkv strategy for the CPU" in text
    assert "models[1].strategy: only rwkv models have a strategy" in text
    assert "models[1].tokenizer: only rwkv models and onnx embedders name a tokenizer" in text
    assert "models[2]" not in text
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "c"\nfile = "c.pth"\nsha256 = "{"0" * 64}"\ntokenizer = "20B_tokenizer.json"\n'
        f'[[models]]\nid = "w"\nfile = "w.pth"\nsha256 = "{"0" * 64}"\ntokenizer = "world"\n')
    catalog = Catalog.load(tmp_path / "catalog.toml")
    assert catalog.get("c").backend == "rwkv" and catalog.get("c").tokenizer == str(tmp_path / "20B_tokenizer.json")
    assert catalog.get("w").tokenizer == "world" and catalog.get("w").strategy is None


def test_a_text_model_carries_its_system_prompt_and_sampling_defaults(tmp_path):
    zeros = "0" * 64
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "a"\nfile = "a.gguf"\nsha256 = "{zeros}"\nsystem_prompt = "Answer in Spanish."\n'
        f'temperature = 0.2\ntop_p = 1\n')
    entry = Catalog.load(tmp_path / "catalog.toml").get("a")
    assert (entry.system_prompt, entry.temperature, entry.top_p) == ("Answer in Spanish.", 0.2, 1.0)
    assert entry.describe()["system_prompt"] == "Answer in Spanish." and entry.describe()["top_p"] == 1.0
    (tmp_path / "catalog.toml").write_text(
        f'[[models]]\nid = "a"\nfile = "a.gguf"\nsha256 = "{zeros}"\ntemperature = "low"\ntop_p = 1.5\n\n'
        f'[[models]]\nid = "c"\nfile = "c.gguf"\nsha256 = "{zeros}"\nsystem_prompt = 3\n\n'
        f'[[models]]\nid = "b"\nfile = "b.onnx"\nsha256 = "{zeros}"\nsystem_prompt = "x"\n'
        f'[[models.inputs]]\nname = "x"\nshape = [1]\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path / "catalog.toml")
    text = "\n".join(err.value.problems)
    assert "models[0].temperature = 'low': must be a number from 0 to 5.0" in text
    assert "models[0].top_p = 1.5: must be a number from 0 to 1.0" in text
    assert "models[1].system_prompt = 3: must be a string" in text
    assert "models[2].system_prompt: only text models take it" in text
