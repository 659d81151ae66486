"""The model catalog: which model files the appliance may load, their digests, prompt formats and licences.

The catalog is a TOML file of ``[[models]]`` tables (format in docs/models.md). Relative ``file`` paths are taken
from the catalog's own directory, so a catalog and its models can be copied together. A model's sha256 is checked
before it is loaded; a mismatch refuses the load and names the file and both digests.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from appliance import templates
from appliance.errors import ChecksumMismatch, ConfigError, ModelError, UnknownModel

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
BACKEND_BY_SUFFIX = {".gguf": "llama_cpp"}


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path
    sha256: str | None  # None only for a file served directly with `serve --model`
    family: str = "unknown"
    template: str | None = None  # named prompt format used when the GGUF embeds no chat template
    licence: str = "unknown"
    size: int | None = None
    backend: str = "llama_cpp"
    source: str = ""

    def describe(self) -> dict:
        return {"id": self.id, "file": str(self.path), "sha256": self.sha256, "size": self.size,
                "family": self.family, "template": self.template, "licence": self.licence,
                "backend": self.backend, "source": self.source}


_KEYS = {f.name for f in fields(ModelEntry)} - {"path"} | {"file"}
_REQUIRED = ("id", "file", "sha256")


def _entry(raw: object, where: str, base: Path, problems: list[str]) -> ModelEntry | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    for key in sorted(set(raw) - _KEYS):
        problems.append(f"{where}.{key}: unknown key")
    for key in _REQUIRED:
        if key not in raw:
            problems.append(f"{where}.{key}: missing")
    for key, value in raw.items():
        if key in _KEYS and key != "size" and not isinstance(value, str):
            problems.append(f"{where}.{key} = {value!r}: must be a string")
    if len(problems) > before:
        return None
    if not _ID.match(raw["id"]):
        problems.append(f"{where}.id = {raw['id']!r}: must be 1-128 letters, digits, '_', '.', ':' or '-'")
    sha = raw["sha256"].lower()
    if not _SHA256.match(sha):
        problems.append(f"{where}.sha256 = {raw['sha256']!r}: must be 64 hex characters")
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        problems.append(f"{where}.size = {size!r}: must be a positive integer (bytes)")
    template = raw.get("template")
    if template is not None and template not in templates.names():
        problems.append(f"{where}.template = {template!r}: unknown template (known: {', '.join(templates.names())})")
    path = Path(raw["file"]).expanduser()
    path = path if path.is_absolute() else base / path
    backend = raw.get("backend") or BACKEND_BY_SUFFIX.get(path.suffix.lower())
    if backend is None:
        problems.append(f"{where}.backend: missing, and '{path.suffix}' files have no default backend")
    if len(problems) > before:
        return None
    return ModelEntry(id=raw["id"], path=path, sha256=sha, family=raw.get("family", "unknown"), template=template,
                      licence=raw.get("licence", "unknown"), size=size, backend=backend, source=raw.get("source", ""))


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
            entry = _entry(raw, f"{path.name}: models[{i}]", path.parent, problems)
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
        backend = BACKEND_BY_SUFFIX.get(path.suffix.lower())
        if backend is None:
            raise ConfigError([f"--model {path}: unsupported file type '{path.suffix}' (expected .gguf)"])
        if not path.is_file():
            raise ConfigError([f"--model {path}: file not found"])
        entry = ModelEntry(id=path.stem, path=path.resolve(), sha256=None, backend=backend,
                           size=path.stat().st_size, source="--model")
        return cls([entry], "--model")

    def __iter__(self):
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


def verify(entry: ModelEntry) -> None:
    """Refuse a model whose file is missing, of the wrong size, or whose sha256 differs from the catalog."""
    if not entry.path.is_file():
        raise ModelError(f"model '{entry.id}': file {entry.path} not found")
    if entry.sha256 is None:
        return
    size = entry.path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumMismatch(f"model '{entry.id}': {entry.path} is {size} bytes, the catalog expects {entry.size}")
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        raise ChecksumMismatch(f"model '{entry.id}': sha256 mismatch for {entry.path}: "
                               f"file has {actual}, catalog expects {entry.sha256}")
