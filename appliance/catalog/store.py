"""The model catalog: which model files the appliance may load, their digests, prompt formats and licences.

The catalog is a TOML file of ``[[models]]`` tables (format in docs/models.md). Relative ``file`` paths are taken
from the catalog's own directory, so a catalog and its models can be copied together. A model's sha256 (and its
LoRA adapter's) is checked before it is loaded; a mismatch refuses the load and names the file and both digests.
A model whose licence forbids commercial use is loaded only when the operator says so.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

from appliance import backends
from appliance.catalog.entry import ModelEntry
from appliance.catalog.parse import parse_entry
from appliance.errors import ChecksumMismatch, ConfigError, ModelError, UnknownModel


class Catalog:
    """An ordered, read-only set of model entries."""

    def __init__(self, entries: list[ModelEntry], origin: str) -> None:
        self._entries = {e.id: e for e in entries}
        #: where the entries came from, for messages ("catalog.toml", "built-in", "--model")
        self.origin = origin

    @classmethod
    def load(cls, path: Path) -> Catalog:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read catalog: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        problems: list[str] = [f"{path}: unknown top-level key '{k}'" for k in data if k != "models"]
        raw_models = data.get("models", [])
        if not isinstance(raw_models, list):
            problems.append(f"{path}: 'models' must be an array of tables ([[models]])")
            raw_models = []
        entries, seen = [], set()
        for i, raw in enumerate(raw_models):
            entry = parse_entry(raw, f"{path.name}: models[{i}]", path.parent, problems)
            if entry is None:
                continue
            if entry.id in seen:
                problems.append(f"{path.name}: models[{i}].id = {entry.id!r}: duplicate id")
            seen.add(entry.id)
            entries.append(entry)
        if problems:
            raise ConfigError(problems)
        return cls(entries, str(path))

    @classmethod
    def single_file(cls, path: Path) -> Catalog:
        """A catalog of one file served directly (``serve --model``): no digest to check against."""
        backend = backends.for_suffix(path.suffix)
        if backend is None:
            raise ConfigError([f"--model {path}: unsupported file type '{path.suffix}' "
                               f"(expected {', '.join(backends.suffixes())})"])
        if not path.is_file():
            raise ConfigError([f"--model {path}: file not found"])
        entry = ModelEntry(id=path.stem, path=path.resolve(), sha256=None, backend=backend,
                           size=path.stat().st_size, source="--model")
        return cls([entry], "--model")

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise UnknownModel(f"unknown model '{model_id}' (available: {known})", param="model") from None

    @property
    def ids(self) -> list[str]:
        return list(self._entries)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_file(model_id: str, path: Path, expected: str | None, size: int | None = None) -> None:
    if not path.is_file():
        raise ModelError(f"model '{model_id}': file {path} not found")
    if expected is None:
        return
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumMismatch(f"model '{model_id}': {path} is {actual_size} bytes, the catalog expects {size}")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatch(f"model '{model_id}': sha256 mismatch for {path}: "
                               f"file has {actual}, catalog expects {expected}")


def verify(entry: ModelEntry) -> None:
    """Refuse a model whose file (or LoRA adapter) is missing, of the wrong size, or differs from its sha256."""
    _check_file(entry.id, entry.path, entry.sha256, entry.size)
    if entry.lora is not None:
        _check_file(entry.id, entry.lora, entry.lora_sha256)


def licence_problem(entry: ModelEntry, allow_noncommercial: bool) -> str | None:
    """Why this model may not be loaded under the operator's licence policy, if it may not."""
    if entry.commercial_use is False and not allow_noncommercial:
        return (f"model '{entry.id}' is licensed for non-commercial use only ({entry.licence}); set "
                f"models.allow_noncommercial = true to load it")
    return None
