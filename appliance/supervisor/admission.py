"""Memory admission: will a model fit before we load it?

Each backend's probe estimates what its model will take with the ``[worker]`` settings (backends/llama_probe.py and
backends/rwkv_probe.py say how); admission compares that with the memory the board has, or with
``memory.budget_mib``, and refuses a load that will not fit, naming the keys that change the outcome.
"""

from __future__ import annotations

from dataclasses import replace

from appliance import backends
from appliance.backends.base import EngineSettings
from appliance.backends.probe import Footprint, MiB
from appliance.catalog.entry import ModelEntry
from appliance.config.schema import Config
from appliance.errors import InsufficientMemory

__all__ = ["Footprint", "check", "estimate"]


def estimate(entry: ModelEntry, config: Config, slots: int | None = None) -> Footprint | None:
    """Memory the model needs with this config's context and batch size, and ``slots`` requests at once (the KV
    cache of every slot; worker.parallel when not given); None for files we cannot read ahead."""
    settings = EngineSettings.from_config(config.worker)
    if slots is not None:
        settings = replace(settings, parallel=slots)
    return backends.probe_for(entry.backend).footprint(entry, settings, config.memory.margin_mib * MiB)


def check(footprint: Footprint, available: int, *, budget_set: bool) -> None:
    """Raise InsufficientMemory, naming needed and available MiB and the keys that change the outcome."""
    if footprint.total <= available:
        return
    source = "memory.budget_mib" if budget_set else "MemAvailable"
    raise InsufficientMemory(
        f"model '{footprint.model_id}' needs about {footprint.total / MiB:.0f} MiB ({footprint.describe()}) but "
        f"{available / MiB:.0f} MiB are available ({source}); {footprint.smaller}, or override with "
        f"memory.budget_mib (or memory.admission = false)")
