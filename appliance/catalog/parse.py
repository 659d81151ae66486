"""Turning a catalog's ``[[models]]`` tables into entries, with a problem named for every bad key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance import backends
from appliance.backends import templates
from appliance.catalog.entry import DTYPES, EMBEDDER, ModelEntry, OutputSpec, TensorSpec
from appliance.config.schema import rwkv_strategy_problem
from appliance.tensors import features as text_features

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

_STRINGS = ("id", "file", "sha256", "family", "template", "licence", "backend", "source", "lora", "lora_sha256",
            "strategy", "tokenizer", "featurize", "system_prompt", "role")
_KEYS = set(_STRINGS) | {"size", "lora_scale", "commercial_use", "inputs", "outputs", "temperature", "top_p",
                         "max_tokens"}
_SAMPLING = {"temperature": 5.0, "top_p": 1.0}  # request defaults a text model's entry may set, and their maximum
_REQUIRED = ("id", "file", "sha256")


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _named_tables(raw: list[Any], where: str, keys: set[str],
                  problems: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each table of an array with a string 'name' and where it is (``models[0].inputs[1]``); a problem for each
    that is not one, and for its first unknown key."""
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"{at}: must be a table with a string 'name'")
            continue
        unknown = sorted(set(item) - keys - {"name"})
        if unknown:
            problems.append(f"{at}.{unknown[0]}: unknown key")
        yield at, item


def _tensor_specs(raw: Any, where: str, problems: list[str]) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: must be a non-empty array of tables ([[models.inputs]])")
        return ()
    specs = []
    for at, item in _named_tables(raw, where, {"dtype", "shape"}, problems):
        dtype = item.get("dtype", "float32")
        if dtype not in DTYPES:
            problems.append(f"{at}.dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
        shape = item.get("shape")
        if not isinstance(shape, list) or not shape or not all(
                (isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1)) or isinstance(d, str)
                for d in shape):
            problems.append(f"{at}.shape = {shape!r}: must be a list of positive sizes, -1 or names for any size")
            continue
        specs.append(TensorSpec(item["name"], dtype, tuple(d if isinstance(d, int) and d > 0 else None
                                                            for d in shape)))
    return tuple(specs)


def _output_specs(raw: Any, where: str, problems: list[str]) -> tuple[OutputSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{where}: must be an array of tables ([[models.outputs]])")
        return ()
    specs = []
    for at, item in _named_tables(raw, where, {"labels", "threshold"}, problems):
        labels = item.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            problems.append(f"{at}.labels: must be a list of strings")
            labels = []
        threshold = item.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or len(labels) != 2):
            problems.append(f"{at}.threshold: must be a number, with exactly two labels (below, at or above)")
            threshold = None
        specs.append(OutputSpec(item["name"], tuple(labels), None if threshold is None else float(threshold)))
    return tuple(specs)


def parse_entry(raw: object, where: str, base: Path, problems: list[str]) -> ModelEntry | None:
    """One ``[[models]]`` table; appends a problem per bad key and returns None when there was any."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    problems.extend(f"{where}.{key}: unknown key" for key in sorted(set(raw) - _KEYS))
    problems.extend(f"{where}.{key}: missing" for key in _REQUIRED if key not in raw)
    problems.extend(f"{where}.{key} = {raw[key]!r}: must be a string" for key in _STRINGS
                    if key in raw and not isinstance(raw[key], str))
    if len(problems) > before:
        return None
    if not _ID.fullmatch(raw["id"]):
        problems.append(f"{where}.id = {raw['id']!r}: must be 1-128 letters, digits, '_', '.', ':' or '-'")
    for key in ("sha256", "lora_sha256"):
        if key in raw and not _SHA256.fullmatch(raw[key].lower()):
            problems.append(f"{where}.{key} = {raw[key]!r}: must be 64 hex characters")
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        problems.append(f"{where}.size = {size!r}: must be a positive integer (bytes)")
    commercial = raw.get("commercial_use", "unknown")
    if commercial not in (True, False, "unknown"):
        problems.append(f"{where}.commercial_use = {commercial!r}: must be true, false or \"unknown\"")
    scale = raw.get("lora_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        problems.append(f"{where}.lora_scale = {scale!r}: must be a number")
    if ("lora" in raw) != ("lora_sha256" in raw):
        problems.append(f"{where}: lora and lora_sha256 go together")
    template = raw.get("template")
    if template is not None and template not in templates.names():
        problems.append(f"{where}.template = {template!r}: unknown template (known: {', '.join(templates.names())})")
    path = _path(raw["file"], base)
    backend = raw.get("backend") or backends.for_suffix(path.suffix)
    if not isinstance(backend, str):
        problems.append(f"{where}.backend: missing, and '{path.suffix}' files have no default backend")
    elif backend not in backends.names():
        problems.append(f"{where}.backend = {backend!r}: must be one of {', '.join(backends.names())}")
    inputs = _tensor_specs(raw["inputs"], f"{where}.inputs", problems) if "inputs" in raw else ()
    outputs = _output_specs(raw.get("outputs"), f"{where}.outputs", problems)
    if backend == "onnx" and "inputs" not in raw:
        problems.append(f"{where}.inputs: missing (an onnx model declares its inputs)")
    strategy = raw.get("strategy")
    if strategy is not None and backend != "rwkv":
        problems.append(f"{where}.strategy: only rwkv models have a strategy")
    elif isinstance(strategy, str) and (problem := rwkv_strategy_problem(strategy)):
        problems.append(f"{where}.strategy = {strategy!r}: {problem}")
    if "tokenizer" in raw and backend != "rwkv" and raw.get("role") != EMBEDDER:
        problems.append(f"{where}.tokenizer: only rwkv models and onnx embedders name a tokenizer")
    _embedder_problems(raw, where, backend, inputs, problems)
    if backend != "onnx" and ("inputs" in raw or "outputs" in raw):
        problems.append(f"{where}: inputs/outputs are for onnx models")
    for key in ("system_prompt", *_SAMPLING):
        if key in raw and backend == "onnx":
            problems.append(f"{where}.{key}: only text models take it")
    for key, high in _SAMPLING.items():
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= high):
            problems.append(f"{where}.{key} = {value!r}: must be a number from 0 to {high}")
    featurize = raw.get("featurize")
    if featurize is not None and backend != "onnx":
        problems.append(f"{where}.featurize: only onnx text classifiers are featurized")
    elif featurize is not None and inputs and (problem := text_features.problem(featurize, inputs)):
        problems.append(f"{where}.featurize = {featurize!r}: {problem}")
    if len(problems) > before or not isinstance(backend, str):
        return None
    return ModelEntry(
        id=raw["id"], path=path, sha256=raw["sha256"].lower(), family=raw.get("family", "unknown"),
        template=template, system_prompt=raw.get("system_prompt"), licence=raw.get("licence", "unknown"),
        **{k: float(raw[k]) for k in _SAMPLING if k in raw},
        commercial_use=None if commercial == "unknown" else commercial, size=size, backend=backend,
        source=raw.get("source", ""), lora=_path(raw["lora"], base) if "lora" in raw else None,
        lora_sha256=raw["lora_sha256"].lower() if "lora_sha256" in raw else None, lora_scale=float(scale),
        strategy=raw.get("strategy"), tokenizer=_tokenizer(raw.get("tokenizer"), base), inputs=inputs,
        outputs=outputs, featurize=featurize, role=raw.get("role"), max_tokens=raw.get("max_tokens"))


#: the inputs an embedder's graph takes from its tokenizer (token_type_ids only where the graph has it)
EMBEDDER_INPUTS = ("input_ids", "attention_mask")


def _embedder_problems(raw: dict[str, Any], where: str, backend: object, inputs: tuple[TensorSpec, ...],
                       problems: list[str]) -> None:
    """An embedding model (``role = "embedder"``) is an onnx graph fed by a tokenizer.json, with a token limit."""
    role, limit = raw.get("role"), raw.get("max_tokens")
    if role is None:
        if limit is not None:
            problems.append(f"{where}.max_tokens: only embedders (role = \"{EMBEDDER}\") take it")
        return
    if role != EMBEDDER:
        problems.append(f"{where}.role = {role!r}: must be \"{EMBEDDER}\" (the one role so far)")
        return
    if backend != "onnx":
        problems.append(f"{where}.role: an embedder is an onnx model")
    if "tokenizer" not in raw:
        problems.append(f"{where}.tokenizer: missing (an embedder names its tokenizer.json)")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 3:
        problems.append(f"{where}.max_tokens = {limit!r}: must be the model's token limit, an integer of at least 3 "
                        f"(sentence-transformers' max_seq_length)")
    if "featurize" in raw:
        problems.append(f"{where}.featurize: an embedder tokenizes its text; featurize is for classifiers")
    names = {s.name for s in inputs}
    missing = [n for n in EMBEDDER_INPUTS if n not in names]
    extra = sorted(names - {*EMBEDDER_INPUTS, "token_type_ids"})
    if inputs and (missing or extra):
        problems.append(f"{where}.inputs: an embedder takes input_ids and attention_mask (and token_type_ids), "
                        f"not {sorted(names)}")


def _tokenizer(value: str | None, base: Path) -> str | None:
    """"world" (the vocabulary shipped with the rwkv package) or a tokenizer file next to the catalog."""
    return value if value in (None, "world") else str(_path(value, base))
