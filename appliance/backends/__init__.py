"""Inference backends, found by name and imported only where and when they are needed.

An engine such as torch or llama.cpp costs memory (and on some boards can crash at import), so the registry holds
``"module:Class"`` strings, not classes: the parent imports a backend's probe (probe.py: header reads, no engine)
to refuse or size a model before loading it, and only the worker imports the engine itself. A new backend is one
entry here (DEVELOPERS.md, "Adding a backend").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.errors import BackendUnavailable

if TYPE_CHECKING:
    from appliance.backends.base import Backend, EngineSettings
    from appliance.backends.probe import Probe


@dataclass(frozen=True)
class Plugin:
    engine: str  # "module:Class" of the engine, imported in a worker process only
    probe: str  # "module:Class" of its Probe, imported in the parent: reads headers, never the engine
    extra: str  # the pip extra that installs the engine
    suffix: str = ""  # files of this type get this backend when their catalog entry names none
    generates_text: bool = True  # False: a tensor model, served on the infer routes


REGISTRY: dict[str, Plugin] = {
    "llama_cpp": Plugin("appliance.backends.llama_cpp:LlamaCppBackend", "appliance.backends.llama_probe:LlamaProbe",
                        "llama", ".gguf"),
    "rwkv": Plugin("appliance.backends.rwkv:RwkvBackend", "appliance.backends.rwkv_probe:RwkvProbe", "rwkv", ".pth"),
    # tensor models: the ONNX worker runs them (process/onnx_worker.py), beside the text engine
    "onnx": Plugin("appliance.backends.onnx:OnnxSessions", "appliance.backends.probe:Probe", "onnx", ".onnx",
                   generates_text=False),
    # the scripted engine of the tests, shipped as gpiozero ships MockFactory; its model file is a JSON object
    "fake": Plugin("appliance.backends.fake:FakeBackend", "appliance.backends.fake:FakeProbe", ""),
}


def names() -> list[str]:
    return list(REGISTRY)


def for_suffix(suffix: str) -> str | None:
    """The backend of a file type (``.gguf``), if one is registered for it."""
    return next((name for name, p in REGISTRY.items() if p.suffix and p.suffix == suffix.lower()), None)


def suffixes() -> list[str]:
    return [p.suffix for p in REGISTRY.values() if p.suffix]


def generates_text(name: str) -> bool:
    plugin = REGISTRY.get(name)
    return plugin is not None and plugin.generates_text


def _plugin(name: str) -> Plugin:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(REGISTRY)})") from None


def _load(target: str, name: str, extra: str) -> Any:
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend '{name}' needs its engine: pip install 'appliance[{extra}]' "
                                 f"({exc})") from None
    return getattr(module, class_name)


def probe_for(name: str) -> Probe:
    """The parent's view of backend ``name``'s files (BackendUnavailable for a name that is not registered)."""
    plugin = _plugin(name)
    probe_class: type[Probe] = _load(plugin.probe, name, plugin.extra)
    return probe_class()


def create(name: str, settings: EngineSettings) -> Backend:
    """A text backend, in the worker process."""
    plugin = _plugin(name)
    engine_class: type[Backend] = _load(plugin.engine, name, plugin.extra)
    return engine_class(settings)
