"""A catalog entry: one model file the appliance may load, with what it needs to run and what it may be used for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import backends

EMBEDDER = "embedder"  # the role of an embedding model
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """A declared model input: requests are checked against it before the engine sees them."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None: any size (a batch or sequence axis)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [-1 if d is None else d for d in self.shape]}


@dataclass(frozen=True)
class OutputSpec:
    """A declared model output; with labels, scores are returned per label (and the best one named)."""

    name: str
    labels: tuple[str, ...] = ()
    threshold: float | None = None  # one score per row: >= threshold is labels[1], else labels[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "threshold": self.threshold}


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path
    sha256: str | None  # None only for a file served directly with `serve --model`
    family: str = "unknown"
    template: str | None = None  # named prompt format; wins over a chat template the GGUF embeds
    system_prompt: str | None = None  # put before a chat request that has no system message (None: no default)
    temperature: float | None = None  # sampling defaults for requests that set none (None: llama-cpp-python's)
    top_p: float | None = None
    licence: str = "unknown"
    commercial_use: bool | None = None  # None: unknown
    size: int | None = None
    backend: str = "llama_cpp"
    source: str = ""
    # llama.cpp: a LoRA adapter (GGUF) applied at load, Alpaca-LoRA style
    lora: Path | None = None
    lora_sha256: str | None = None
    lora_scale: float = 1.0
    # rwkv: runtime strategy and tokenizer ("world" or a 20B_tokenizer.json path); an onnx embedder's tokenizer is
    # a Hugging Face tokenizer.json (read with the `tokenizers` library)
    strategy: str | None = None
    tokenizer: str | None = None
    # onnx: declared inputs and outputs
    inputs: tuple[TensorSpec, ...] = field(default=())
    outputs: tuple[OutputSpec, ...] = field(default=())
    # onnx text classifiers (the moderation filter): how text becomes the input tensor (tensors/features.py)
    featurize: str | None = None
    # onnx embedding models (tensors/embedder.py): role "embedder", and the most tokens one text may take
    role: str | None = None
    max_tokens: int | None = None

    @property
    def embeds(self) -> bool:
        """An embedding model: served on /v1/embeddings, /api/embed and <prefix>/<device>/embed."""
        return self.role == EMBEDDER

    @property
    def generates_text(self) -> bool:
        """False for tensor models, which answer /v1/infer and <prefix>/<device>/infer/<model> instead."""
        return backends.generates_text(self.backend)

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "file": str(self.path), "sha256": self.sha256, "size": self.size,
                "family": self.family, "template": self.template, "licence": self.licence,
                "commercial_use": "unknown" if self.commercial_use is None else self.commercial_use,
                "backend": self.backend, "source": self.source}
        body.update({k: v for k, v in (("system_prompt", self.system_prompt), ("temperature", self.temperature),
                                       ("top_p", self.top_p)) if v is not None})
        if self.lora:
            body.update(lora=str(self.lora), lora_sha256=self.lora_sha256, lora_scale=self.lora_scale)
        if self.strategy or self.tokenizer:
            body.update(strategy=self.strategy, tokenizer=self.tokenizer)
        if self.inputs:
            body.update(inputs=[i.describe() for i in self.inputs], outputs=[o.describe() for o in self.outputs])
        if self.featurize:
            body["featurize"] = self.featurize
        if self.role:
            body.update(role=self.role, max_tokens=self.max_tokens)
        return body
