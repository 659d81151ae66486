"""JSON tensors in and out of ONNX models: requests are checked against the catalog's declared inputs before the
engine sees them (errors name the input), and outputs are returned with labels and scores where declared."""

from __future__ import annotations

from typing import Any

from appliance.catalog.entry import OutputSpec, TensorSpec
from appliance.errors import BadRequest

MAX_ELEMENTS = 1 << 20  # per input: a sensor reading, not a video


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


def to_arrays(inputs: Any, specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Validated numpy arrays for the model, by input name."""
    import numpy as np

    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be an object mapping each input name to a (nested) list", param="inputs")
    names = {s.name for s in specs}
    for name in inputs:
        if name not in names:
            raise BadRequest(f"unknown input '{name}' (the model takes: {', '.join(sorted(names))})",
                             param=f"inputs.{name}")
    arrays = {}
    for spec in specs:
        where = f"inputs.{spec.name}"
        if spec.name not in inputs:
            raise BadRequest(f"input '{spec.name}' is missing", param=where)
        value = inputs[spec.name]
        try:
            array = np.asarray(value, dtype=spec.dtype)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(f"input '{spec.name}' must be a rectangular nested list of {spec.dtype} values",
                             param=where) from None
        if array.dtype == object or array.size > MAX_ELEMENTS:
            raise BadRequest(f"input '{spec.name}' is not a rectangular list of at most {MAX_ELEMENTS} numbers",
                             param=where)
        if spec.dtype.startswith("float") and not np.all(np.isfinite(array)):
            raise BadRequest(f"input '{spec.name}' holds NaN or infinity", param=where)
        if array.ndim == len(spec.shape) - 1 and spec.shape and spec.shape[0] is None:
            array = array[np.newaxis]  # one sample for a model with a batch axis
        shape_ok = array.ndim == len(spec.shape) and all(
            want is None or got == want for got, want in zip(array.shape, spec.shape, strict=True))
        if not shape_ok:
            raise BadRequest(f"input '{spec.name}' has shape {tuple(array.shape)}; the model takes "
                             f"{_shape_text(spec.shape)}", param=where)
        arrays[spec.name] = array
    return arrays


def describe_outputs(results: dict[str, Any], specs: tuple[OutputSpec, ...]) -> dict[str, dict]:
    """Each output's values, plus per-row labels and scores where the catalog declares labels."""
    import numpy as np

    declared = {s.name: s for s in specs}
    out = {}
    for name, array in results.items():
        array = np.asarray(array)
        body: dict = {"values": array.tolist(), "shape": list(array.shape)}
        spec = declared.get(name)
        if spec is not None and spec.labels:
            rows = array.reshape(array.shape[0] if array.ndim else 1, -1)
            if spec.threshold is not None and rows.shape[1] == 1:
                body["labels"] = [spec.labels[1] if float(r[0]) >= spec.threshold else spec.labels[0] for r in rows]
            elif rows.shape[1] == len(spec.labels):
                body["labels"] = [spec.labels[int(np.argmax(r))] for r in rows]
                body["scores"] = [{label: float(v) for label, v in zip(spec.labels, r, strict=True)} for r in rows]
            elif np.issubdtype(rows.dtype, np.integer) and rows.shape[1] == 1:
                body["labels"] = [spec.labels[int(r[0])] if 0 <= int(r[0]) < len(spec.labels) else None
                                  for r in rows]
        out[name] = body
    return out
