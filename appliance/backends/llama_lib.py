"""llama-cpp-python's ctypes bindings to llama.cpp, without the package's high-level half until something asks for it.

``import llama_cpp`` runs the package's ``__init__``, which imports ``llama_cpp.llama`` (the ``Llama`` class) and
with it numpy, diskcache and sqlite3: 15 MiB of a worker's resident memory, measured (docs/benchmarks.md). The
batched path (llama_batch.py) needs none of it: it talks to llama.cpp's C API alone (llama_model.py). So
:func:`bindings` puts a stand-in package in ``sys.modules`` that holds what the real package's
``from .llama_cpp import *`` would (every C function and constant), and imports the real package only when a name it
lacks (``Llama``, ``LlamaGrammar``...) is first asked of it: ``import llama_cpp`` anywhere else in the worker keeps
working unchanged, and the serial path (which uses ``Llama``) loads the rest on its first use.

Pinned to llama-cpp-python 0.3.x's layout (``llama_cpp/llama_cpp.py`` holds the bindings and imports nothing from
the package but ``_ctypes_extensions``); tests/integration/test_llama_lean.py checks that the stand-in is used and
that numpy stays out.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import sys
import types
from typing import Any

_PACKAGE = "llama_cpp"
# ggml's log levels (ggml.h): DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (the rest of the line before). The worker's
# stderr is the service's journal: llama.cpp's errors go there (a failed load, a failed decode's reason), its loading
# chatter and warnings do not
_ERROR, _CONTINUED = 4, 5


class _StandIn(types.ModuleType):
    """The ``llama_cpp`` package with only its bindings loaded; anything else loads the real package."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        return getattr(_real_package(), name)


def bindings() -> Any:
    """The ``llama_cpp`` package as far as llama.cpp's C API goes (the real package when it is already loaded)."""
    package = sys.modules.get(_PACKAGE)
    if package is None:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(f"No module named '{_PACKAGE}'", name=_PACKAGE)
        package = _StandIn(_PACKAGE)
        package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
        package.__file__, package.__package__ = spec.origin, _PACKAGE
        sys.modules[_PACKAGE] = package
        try:
            c_api = importlib.import_module(f"{_PACKAGE}.llama_cpp")
        except BaseException:
            del sys.modules[_PACKAGE]
            raise
        # what the real __init__'s `from .llama_cpp import *` binds
        names = getattr(c_api, "__all__", None) or [n for n in vars(c_api) if not n.startswith("_")]
        package.__dict__.update({n: getattr(c_api, n) for n in names})
        _quiet(c_api)
    return package


def is_stand_in() -> bool:
    """Whether the worker runs on the bindings alone (the real package, with numpy, not loaded)."""
    return isinstance(sys.modules.get(_PACKAGE), _StandIn)


def _real_package() -> Any:
    stand_in = sys.modules.get(_PACKAGE)
    if isinstance(stand_in, _StandIn):
        del sys.modules[_PACKAGE]  # the real __init__ reuses the bindings module already loaded
        try:
            real = importlib.import_module(_PACKAGE)
        except BaseException:
            sys.modules[_PACKAGE] = stand_in
            raise
        # a submodule is bound to its package only when first imported: those loaded under the stand-in, again
        for name, module in list(sys.modules.items()):
            if name.startswith(f"{_PACKAGE}.") and name.count(".") == 1:
                setattr(real, name.split(".", 1)[1], module)
        return real
    return importlib.import_module(_PACKAGE)


_printing = False  # whether the line a CONT message continues was printed


def _log_errors_only(level: int, text: bytes, _user: object) -> None:
    global _printing
    _printing = level == _ERROR or (level == _CONTINUED and _printing)
    if _printing:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


_callback: Any = None  # the C function pointer must outlive every llama.cpp call


def _quiet(c_api: Any) -> None:
    """llama.cpp logs everything to stderr until a callback is set (the real package's _logger, loaded with
    ``Llama``, sets its own)."""
    global _callback
    _callback = c_api.llama_log_callback(_log_errors_only)
    c_api.llama_log_set(_callback, ctypes.c_void_p(0))
