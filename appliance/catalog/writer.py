"""Adding a model file to a catalog: digest, size, what its header says, a valid ``[[models]]`` entry appended."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import backends
from appliance.catalog import families
from appliance.catalog.entry import ModelEntry
from appliance.catalog.store import Catalog, sha256_file
from appliance.config import toml_text
from appliance.config.schema import rwkv_strategy_problem
from appliance.errors import ConfigError, ModelError


@dataclass(frozen=True)
class NewEntry:
    path: Path
    family: str
    id: str | None = None
    template: str | None = None
    licence: str | None = None
    commercial_use: bool | None | str = "default"  # "default": the family's
    source: str | None = None
    lora: Path | None = None
    lora_scale: float = 1.0
    tokenizer: Path | None = None  # rwkv: a Raven model's 20B_tokenizer.json
    strategy: str | None = None  # rwkv: overrides worker.rwkv_strategy
    labels: tuple[str, ...] = ()  # onnx: labels of the first output
    threshold: float | None = None  # onnx: one score per row, labels[1] at or above it
    featurize: str | None = None  # onnx: a text classifier for the moderation filter (text_features.py)
    system_prompt: str | None = None  # text models: put before a chat request that has no system message


def default_id(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "-", path.stem.lower()).strip("-.")[:128] or "model"


def dumps(entries: list[dict[str, Any]]) -> str:
    """A catalog file of ``[[models]]`` tables; lists of tables (an ONNX model's inputs, outputs) as sub-tables."""
    blocks = []
    for entry in entries:
        nested = {k: v for k, v in entry.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
        lines = toml_text.table("models", {k: v for k, v in entry.items() if k not in nested}, array=True)
        for key, tables in nested.items():
            for table in tables:
                lines += ["", *toml_text.table(f"models.{key}", table, array=True)]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _probe_facts(new: NewEntry, backend: str) -> dict[str, Any]:
    """What the file's header says, after the checks a load would make (architecture; RWKV vocabulary and
    tokenizer file)."""
    if new.tokenizer is not None and not new.tokenizer.is_file():
        raise ModelError(f"{new.tokenizer}: tokenizer file not found")
    if new.strategy is not None and (problem := rwkv_strategy_problem(new.strategy)):
        raise ModelError(f"--strategy {new.strategy!r}: {problem}")
    entry = ModelEntry(id=new.id or default_id(new.path), path=new.path, sha256=None, backend=backend,
                       tokenizer=str(new.tokenizer.resolve()) if new.tokenizer else None, strategy=new.strategy)
    return backends.probe_for(backend).facts(entry)


def build(new: NewEntry, catalog_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The entry's keys (relative paths where the file sits under the catalog's directory) and header facts."""
    if not new.path.is_file():
        raise ModelError(f"{new.path}: file not found")
    backend = backends.for_suffix(new.path.suffix)
    if backend is None:
        raise ModelError(f"{new.path}: unsupported file type (expected {', '.join(backends.suffixes())})")
    if (new.tokenizer or new.strategy) and backend != "rwkv":
        raise ModelError(f"{new.path}: --tokenizer and --strategy are for RWKV .pth checkpoints")
    if (new.labels or new.threshold is not None or new.featurize) and backend != "onnx":
        raise ModelError(f"{new.path}: --labels, --threshold and --featurize are for ONNX models")
    if new.system_prompt is not None and backend == "onnx":
        raise ModelError(f"{new.path}: --system-prompt is for text models")
    tables: dict[str, Any] = {}
    if backend == "onnx":
        from appliance.catalog import onnx_meta
        inputs, outputs = onnx_meta.read(new.path)
        facts = onnx_meta.describe(inputs, outputs)
        if new.labels or new.threshold is not None:
            outputs[0].update({"labels": list(new.labels)} if new.labels else {})
            outputs[0].update({"threshold": float(new.threshold)} if new.threshold is not None else {})
        tables = {"inputs": inputs, "outputs": outputs}
    else:
        facts = _probe_facts(new, backend)
    known = families.get(new.family)
    template = new.template
    if template is None and not facts.get("chat_template") and backend != "onnx":
        template = known.template  # without a chat template of its own, the GGUF gets the family's format
    commercial = known.commercial_use if new.commercial_use == "default" else new.commercial_use

    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(catalog_dir.resolve()))
        except ValueError:
            return str(path.resolve())

    keys: dict[str, Any] = {"id": new.id or default_id(new.path), "file": rel(new.path),
                            "sha256": sha256_file(new.path), "size": new.path.stat().st_size, "family": new.family}
    if template:
        keys["template"] = template
    if new.system_prompt is not None:
        keys["system_prompt"] = new.system_prompt
    keys["licence"] = new.licence or known.licence
    keys["commercial_use"] = "unknown" if commercial is None else commercial
    if new.source or known.source:
        keys["source"] = new.source or known.source
    if new.lora is not None:
        if not new.lora.is_file():
            raise ModelError(f"{new.lora}: LoRA adapter not found")
        keys.update(lora=rel(new.lora), lora_sha256=sha256_file(new.lora), lora_scale=float(new.lora_scale))
    if new.tokenizer is not None:
        keys["tokenizer"] = rel(new.tokenizer)
    if new.strategy is not None:
        keys["strategy"] = new.strategy
    if new.featurize is not None:
        keys["featurize"] = new.featurize
    return {**keys, **tables}, facts  # the tables last: TOML sub-tables follow the entry's own keys


def append(catalog_path: Path, keys: dict[str, Any]) -> None:
    """Append an entry; the result is parsed again and the file left unchanged if it would not be valid."""
    catalog_path.parent.mkdir(parents=True, exist_ok=True)
    before = catalog_path.read_text(encoding="utf-8") if catalog_path.exists() else ""
    if before.strip():
        existing = Catalog.load(catalog_path)
        if keys["id"] in existing:
            raise ConfigError([f"{catalog_path}: a model with id {keys['id']!r} is already in the catalog "
                               f"(choose another with --id)"])
    block = dumps([keys])
    text = (before.rstrip("\n") + "\n\n" if before.strip() else "") + block
    candidate = catalog_path.with_suffix(".toml.new")
    candidate.write_text(text, encoding="utf-8")
    try:
        Catalog.load(candidate)
    except ConfigError:
        candidate.unlink()
        raise
    candidate.replace(catalog_path)
