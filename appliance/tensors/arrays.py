"""JSON tensors in and out of ONNX models: requests are checked against the catalog's declared inputs before the
engine sees them (errors name the input), and outputs are returned with labels and scores where declared.

A value must fit its input's dtype as it is, because a cast would change it without a word: integer inputs take
integers within the dtype's range (``3.0`` is an integer, ``3.5`` is refused), bool inputs take only ``true`` and
``false``, float inputs take numbers that are finite in that float type, and ``true``/``false`` are never numbers.
"""

from __future__ import annotations

from typing import Any

from appliance.catalog.entry import OutputSpec, TensorSpec
from appliance.errors import BadRequest

MAX_ELEMENTS = 1 << 20  # per input: a sensor reading, not a video


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


def _has_bool(value: Any) -> bool:
    """Whether a nested list holds a JSON true/false: numpy would quietly count it as 1 or 0 among numbers."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            return True
    return False


def _first(array: Any, mask: Any) -> Any:
    return array.reshape(-1)[int(mask.reshape(-1).argmax())].item()


def _typed(value: Any, spec: TensorSpec, where: str) -> Any:
    """The value as an array of the declared dtype, refusing what a cast would change (1.5 -> 1, 2 -> True)."""
    import numpy as np

    name, dtype = spec.name, spec.dtype
    try:
        natural = np.asarray(value)
    except (ValueError, TypeError):
        natural = None
    if natural is None or natural.dtype.kind not in "biuf" or natural.size > MAX_ELEMENTS:
        raise BadRequest(f"input '{name}' must be a rectangular nested list of at most {MAX_ELEMENTS} {dtype} "
                         f"values", param=where)
    want, kind = np.dtype(dtype), natural.dtype.kind
    if natural.size == 0:
        return natural.astype(want)
    if want.kind == "b":
        if kind != "b":
            raise BadRequest(f"input '{name}' is bool: its values must be true or false, not numbers", param=where)
        return natural
    if kind == "b" or _has_bool(value):
        raise BadRequest(f"input '{name}' is {dtype}: true and false are not {dtype} values", param=where)
    if kind == "f" and not np.all(np.isfinite(natural)):
        raise BadRequest(f"input '{name}' holds NaN or infinity", param=where)
    if want.kind in "iu":
        fraction = natural != np.trunc(natural) if kind == "f" else None
        if fraction is not None and fraction.any():
            raise BadRequest(f"input '{name}' is {dtype}: {_first(natural, fraction)!r} is not an integer",
                             param=where)
        info = np.iinfo(want)
        low, high = int(natural.min()), int(natural.max())
        if low < info.min or high > info.max:
            raise BadRequest(f"input '{name}' is {dtype}: {low if low < info.min else high} is outside its range "
                             f"{info.min}..{info.max}", param=where)
        return natural.astype(want)
    with np.errstate(over="ignore"):  # an overflow becomes infinity, refused just below with the value named
        array = natural.astype(want)
    if not np.all(np.isfinite(array)):
        raise BadRequest(f"input '{name}' is {dtype}: {_first(natural, ~np.isfinite(array))!r} is beyond its range "
                         f"(+-{float(np.finfo(want).max):g})", param=where)
    return array


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
        array = _typed(inputs[spec.name], spec, where)
        if array.ndim == len(spec.shape) - 1 and spec.shape and spec.shape[0] is None:
            array = array[np.newaxis]  # one sample for a model with a batch axis
        shape_ok = array.ndim == len(spec.shape) and all(
            want is None or got == want for got, want in zip(array.shape, spec.shape, strict=True))
        if not shape_ok:
            raise BadRequest(f"input '{spec.name}' has shape {tuple(array.shape)}; the model takes "
                             f"{_shape_text(spec.shape)}", param=where)
        arrays[spec.name] = array
    return arrays


def describe_outputs(results: dict[str, Any], specs: tuple[OutputSpec, ...]) -> dict[str, dict[str, Any]]:
    """Each output's values, plus per-row labels and scores where the catalog declares labels."""
    import numpy as np

    declared = {s.name: s for s in specs}
    out = {}
    for name, array in results.items():
        array = np.asarray(array)
        body: dict[str, Any] = {"values": array.tolist(), "shape": list(array.shape)}
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
