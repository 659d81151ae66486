"""What the scheduler may do under the current conditions, and memory admission before every model load.

The supervisor decides the conditions (memory and thermal levels, warnings); the guard turns them into answers the
scheduler asks for: refuse this request? hold the queue? how many threads, what pause per token, what max_tokens
cap? may this model be loaded? Conditions are replaced as a whole, so transport threads can read them unlocked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.backends.probe import MiB
from appliance.catalog import ModelEntry
from appliance.config.schema import Config
from appliance.errors import ApplianceError, Busy, InsufficientMemory, Overheated
from appliance.protocol import GenerateRequest
from appliance.supervisor import admission
from appliance.supervisor.admission import Footprint
from appliance.supervisor.policies import Conditions
from appliance.supervisor.sensors import MemoryReading

log = logging.getLogger(__name__)

ADMISSION_RETRY = 30.0  # seconds before a refused model is tried again (memory may have been freed meanwhile)


class Guard:
    def __init__(self, config: Config, read_memory: Callable[[], MemoryReading | None]) -> None:
        self.config = config
        self._read_memory = read_memory
        self.conditions = Conditions()
        self._estimates: dict[tuple[str, int], Footprint | None] = {}  # by model and slots
        self._refused: dict[str, tuple[ApplianceError, float]] = {}
        self._admitted: dict[str, int] = {}  # the slots each model was last loaded with

    # -- conditions --------------------------------------------------------------------------------------------

    def update(self, conditions: Conditions) -> Conditions:
        """Adopt new conditions; returns the previous ones. A change of memory level clears admission refusals."""
        old, self.conditions = self.conditions, conditions
        if old.memory != conditions.memory:
            self._refused.clear()
        return old

    def refusal(self, request: GenerateRequest, model_id: str) -> ApplianceError | None:
        """Why a new request cannot be accepted now, if it cannot."""
        c = self.conditions
        if c.thermal == "hard":
            return Overheated(c.thermal_reason)
        if c.memory == "critical":
            return Busy(f"{c.memory_reason}; no requests are accepted until memory recovers")
        if c.memory == "low" and request.priority == "low":
            return Busy(f"{c.memory_reason}; low-priority requests are refused")
        refused = self._refused.get(model_id)
        if refused is not None and refused[1] > time.monotonic():
            return refused[0]
        return None

    @property
    def hold(self) -> str | None:
        """Nothing may be started or loaded while this is set (the reason)."""
        c = self.conditions
        if c.memory == "critical":
            return c.memory_reason
        if c.thermal == "hard":
            return c.thermal_reason
        return None

    @property
    def paused(self) -> bool:
        return self.conditions.thermal == "hard"

    def throttle(self, threads: int) -> tuple[int, float]:
        """(threads, pause after each token) for the worker."""
        if self.conditions.thermal == "normal":
            return threads, 0.0
        t = self.config.thermal
        return (t.soft_threads or max(1, threads // 2)), t.soft_token_delay

    def slots(self, configured: int) -> int:
        """Requests to generate at once: one while memory is low (each slot's generation grows the working set),
        so the board sheds parallelism before it refuses requests."""
        return 1 if self.conditions.memory != "normal" else configured

    def max_tokens(self, requested: int) -> int:
        if self.conditions.thermal == "normal":
            return requested
        return min(requested, self.config.thermal.soft_max_tokens)

    # -- admission ---------------------------------------------------------------------------------------------

    def refused_until(self, model_id: str) -> float:
        refused = self._refused.get(model_id)
        return refused[1] if refused else 0.0

    def footprint(self, entry: ModelEntry, slots: int = 1) -> Footprint | None:
        if (entry.id, slots) not in self._estimates:
            self._estimates[(entry.id, slots)] = admission.estimate(entry, self.config, slots)
        return self._estimates[(entry.id, slots)]

    def admit(self, entry: ModelEntry, loaded: ModelEntry | None) -> int:
        """How many requests ``entry`` may run at once: worker.parallel, or fewer slots (each has its own KV cache)
        when that many will not fit. Raises InsufficientMemory when even one will not (after ``loaded`` is
        unloaded)."""
        m, parallel = self.config.memory, self.config.worker.parallel
        if not m.admission:
            return parallel
        footprint = self.footprint(entry, parallel)
        if footprint is None:
            log.info("no memory estimate for %s (%s): loading it unchecked", entry.id, entry.path.suffix)
            return parallel
        if m.budget_mib:
            available, budget_set = m.budget_mib * MiB, True
        else:
            reading = self._read_memory()
            if reading is None:
                log.warning("cannot read %s: loading %s without a memory check", m.meminfo_path, entry.id)
                return parallel
            # the loaded model's file pages already count as available (page cache); its buffers do not
            loaded_footprint = self.footprint(loaded, self._admitted.get(loaded.id, parallel)) \
                if loaded is not None and loaded.id != entry.id else None
            freed = loaded_footprint.anonymous if loaded_footprint else 0
            available, budget_set = reading.available + freed, False
        slots = parallel
        while slots > 1 and footprint is not None and footprint.total > available:
            slots -= 1  # fewer slots before a refusal: a 1 GiB board may run with one
            footprint = self.footprint(entry, slots)
        assert footprint is not None  # the probe estimated the first count: it estimates every count
        try:
            admission.check(footprint, available, budget_set=budget_set)
        except InsufficientMemory as exc:
            self._refused[entry.id] = (exc, time.monotonic() + ADMISSION_RETRY)
            raise
        self._admitted[entry.id] = slots
        if slots < parallel:
            log.warning("memory admission: %s runs %d request(s) at once, not worker.parallel = %d: %.0f MiB "
                        "available", entry.id, slots, parallel, available / MiB)
        log.info("memory admission: %s needs %s, %.0f MiB available", entry.id, footprint.describe(),
                 available / MiB)
        return slots
