"""Inference backends, found by name and imported only when a model that needs one is loaded.

An engine such as torch or llama.cpp costs memory (and on some boards can crash at import), so the registry holds
``"module:Class"`` strings, not classes.
"""

from __future__ import annotations

import importlib

from appliance.backends.base import Backend, EngineSettings
from appliance.errors import BackendUnavailable

REGISTRY: dict[str, tuple[str, str]] = {
    # name: ("module:Class", pip extra that installs its engine)
    "llama_cpp": ("appliance.backends.llama_cpp:LlamaCppBackend", "llama"),
}


def create(name: str, settings: EngineSettings) -> Backend:
    try:
        target, extra = REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(REGISTRY)})") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend '{name}' needs its engine: pip install 'appliance[{extra}]' "
                                 f"({exc})") from None
    return getattr(module, class_name)(settings)
