"""What the parent process may learn about a model file without its engine: whether the engine can run it, and
how much memory it will take. Each backend has a probe (the registry in ``__init__.py`` names it); probes read
file headers only, so importing llama.cpp or torch (hundreds of MB, and on some boards a crash) stays in the
worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.backends.base import EngineSettings
    from appliance.catalog.entry import ModelEntry

MiB = 1 << 20


@dataclass(frozen=True)
class Footprint:
    """The memory a model will take once loaded, by part."""

    model_id: str
    weights: int
    kv_cache: int
    compute: int
    margin: int
    mapped: bool = True  # the weights are the file's pages (llama.cpp's mmap), reclaimable page cache
    cache_name: str = "KV cache"  # what grows with the context (llama.cpp) or the recurrent state (RWKV)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.margin

    @property
    def anonymous(self) -> int:
        """What is not the memory-mapped file: freed when the model is unloaded, not reclaimable before."""
        return self.kv_cache + self.compute + (0 if self.mapped else self.weights)

    def describe(self) -> str:
        parts = (("weights", self.weights), (self.cache_name, self.kv_cache), ("compute", self.compute),
                 ("margin", self.margin))
        return " + ".join(f"{name} {size / MiB:.0f}" for name, size in parts) + f" = {self.total / MiB:.0f} MiB"

    @property
    def smaller(self) -> str:
        """The settings that make this model take less."""
        if not self.mapped:
            return "choose a smaller strategy (the entry's strategy or worker.rwkv_strategy)"
        return "lower worker.context_size or worker.batch_size"


class Probe:
    """The parent's view of one engine's model files. The defaults suit an engine with nothing to check ahead."""

    def check(self, entry: ModelEntry) -> None:
        """Refuse, with ModelError (or UnsupportedArchitecture) naming why, a model the engine cannot run. Cheap:
        it runs before the loaded model is replaced, so a catalog mistake never takes a working model down."""

    def footprint(self, entry: ModelEntry, settings: EngineSettings, margin: int) -> Footprint | None:
        """The memory ``entry`` will take with these settings (``margin`` bytes added); None: no estimate."""
        return None

    def facts(self, entry: ModelEntry) -> dict[str, Any]:
        """What the file's header says that `appliance models add` prints (after :meth:`check`)."""
        self.check(entry)
        return {}
