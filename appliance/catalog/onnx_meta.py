"""What an ONNX file declares that its catalog entry needs: the graph's inputs (names, dtypes, shapes with their
dynamic dimensions) and outputs, read with onnxruntime, the engine that will run the file, so a file it cannot load
is refused at ``models add`` rather than at the first request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.catalog.entry import DTYPES
from appliance.errors import BackendUnavailable, ModelError

#: onnxruntime's type names for the dtypes a catalog entry can declare
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
           "tensor(bool)": "bool"}


def _dim(value: object) -> int | str:
    """A fixed size as it is; a named dynamic axis ("batch") by its name; an unnamed one as -1 (any size)."""
    if isinstance(value, int) and value > 0:
        return value
    return value if isinstance(value, str) and value else -1


def read(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``([{"name", "dtype", "shape"}, ...], [{"name"}, ...])``: the ``[[models.inputs]]`` and ``[[models.outputs]]``
    tables of a catalog entry for this file."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("reading an ONNX model needs onnxruntime: pip install 'appliance[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0][:300]}") from None
    inputs = []
    for spec in session.get_inputs():
        dtype = _DTYPES.get(spec.type)
        if dtype is None:
            raise ModelError(f"{path}: input '{spec.name}' is {spec.type}; catalog inputs are one of "
                             f"{', '.join(DTYPES)}")
        if not spec.shape:
            raise ModelError(f"{path}: input '{spec.name}' is a scalar; catalog inputs are tensors of one or more "
                             f"dimensions")
        inputs.append({"name": spec.name, "dtype": dtype, "shape": [_dim(d) for d in spec.shape]})
    return inputs, [{"name": spec.name} for spec in session.get_outputs()]


def describe(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts `models add` prints."""
    return {"inputs": "; ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in inputs),
            "outputs": ", ".join(o["name"] for o in outputs)}
