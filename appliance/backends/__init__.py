"""Inference backends, found by name and imported only when a model that needs one is loaded.

An engine such as torch or llama.cpp costs memory (and on some boards can crash at import), so the registry holds
``"module:Class"`` strings, not classes.
"""

from __future__ import annotations

import importlib

from appliance.backends.base import Backend, EngineSettings
from appliance.catalog.entry import ModelEntry
from appliance.errors import BackendUnavailable

REGISTRY: dict[str, tuple[str, str]] = {
    # name: ("module:Class", pip extra that installs its engine)
    "llama_cpp": ("appliance.backends.llama_cpp:LlamaCppBackend", "llama"),
    "rwkv": ("appliance.backends.rwkv:RwkvBackend", "rwkv"),
}


def precheck(entry: ModelEntry) -> None:
    """Refuse a model its engine cannot run, without importing the engine: in the parent, before the loaded model
    is replaced. Raises ModelError (or UnsupportedArchitecture) naming the problem."""
    if entry.backend == "llama_cpp":
        from appliance.backends.llama_probe import check_architecture
        check_architecture(entry.path)
    elif entry.backend == "rwkv":
        from appliance.backends import rwkv_probe
        rwkv_probe.inspect(entry)


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
