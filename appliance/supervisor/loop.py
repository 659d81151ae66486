"""The supervisor loop: read the board, decide, tell the others.

Every ``supervisor.interval`` seconds it reads memory, PSI, temperature and throttle flags (sensors.py), runs the
memory and thermal policies (policies.py), hands changed conditions to the scheduler, drives the fan and status LED
(indicators.py), updates the metrics, publishes telemetry, and pings the systemd watchdog while the service is
healthy (its scheduler loop turning, its HTTP server up).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.backends.probe import MiB
from appliance.config.schema import Config
from appliance.firstboot import problems as firstboot_problems
from appliance.generation.scheduler import Scheduler
from appliance.metrics import Metrics
from appliance.status import Status, StatusBoard
from appliance.supervisor.indicators import Indicators
from appliance.supervisor.policies import Conditions, MemoryPolicy, ThermalPolicy, throttle_warnings
from appliance.supervisor.sensors import Sensors
from appliance.supervisor.systemd import Notifier

log = logging.getLogger(__name__)

HEARTBEAT_LIMIT = 10.0  # seconds without a turn of the scheduler loop before the service counts as unhealthy


class Supervisor:
    def __init__(self, config: Config, scheduler: Scheduler, status: StatusBoard, metrics: Metrics,
                 sensors: Sensors, notifier: Notifier, indicators: Indicators,
                 publish_telemetry: Callable[[dict[str, Any]], None] | None = None,
                 extra_health: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.scheduler = scheduler
        self.status = status
        self.metrics = metrics
        self.sensors = sensors
        self.notifier = notifier
        self.indicators = indicators
        self.publish_telemetry = publish_telemetry
        self.extra_health = extra_health
        self.memory_policy = MemoryPolicy(config.memory)
        self.thermal_policy = ThermalPolicy(config.thermal)
        self.conditions = Conditions()
        # what first boot could not apply from the boot partition stays in view until a good file replaces it
        self.setup_warnings = tuple(firstboot_problems(config.device.state_dir))
        self.telemetry: dict[str, Any] = {}
        #: told of every reading (each tick), e.g. the operator page's history; must not block
        self.reading_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._next_telemetry = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        status.subscribe(self._on_status)

    def start(self) -> None:
        self.tick()  # the first reading is in place before any request is admitted
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.supervisor.interval):
            try:
                self.tick()
            except Exception:
                log.exception("supervisor tick failed")

    # -- one reading -------------------------------------------------------------------------------------------

    def tick(self) -> None:
        memory = self.sensors.memory()
        celsius = self.sensors.temperature()
        throttle = self.sensors.throttle()
        rss = self.sensors.process_rss(self.scheduler.worker.pid)
        memory_level, memory_reason = self.memory_policy.update(memory)
        thermal_level, thermal_reason = self.thermal_policy.update(celsius)
        conditions = Conditions(memory=memory_level, memory_reason=memory_reason, thermal=thermal_level,
                                thermal_reason=thermal_reason,
                                warnings=throttle_warnings(throttle) + self.setup_warnings)
        if conditions != self.conditions:
            self.conditions = conditions
            self.scheduler.set_conditions(conditions)
        self.indicators.set_temperature(celsius)
        self.indicators.show(self.status.current.state, hot=thermal_level != "normal")

        m = self.metrics
        if celsius is not None:
            m.temperature.set(celsius)
        if memory is not None:
            m.mem_available.set(memory.available)
            m.swap_free.set(memory.swap_free)
            for kind, value in (("some", memory.psi_some_avg10), ("full", memory.psi_full_avg10)):
                if value is not None:
                    m.memory_pressure.labels(kind).set(value)
        if rss is not None:
            m.worker_rss.set(rss)
        if throttle is not None:
            for flag in ("under_voltage", "frequency_capped", "throttled", "soft_temperature_limit"):
                m.throttle_flags.labels(flag).set(1 if flag in throttle.flags else 0)
        for kind, level, levels in (("memory", memory_level, ("normal", "low", "critical")),
                                    ("thermal", thermal_level, ("normal", "soft", "hard"))):
            for name in levels:
                m.condition.labels(kind, name).set(1 if name == level else 0)

        threads, delay = self.scheduler.worker.throttled
        self.telemetry = {
            "device": self.config.device.id, "ts": round(time.time(), 3), "state": self.status.current.state,
            "model": self.status.current.model, "temperature_c": celsius, "thermal": thermal_level,
            "throttle": {"raw": hex(throttle.raw), "flags": list(throttle.flags)} if throttle else None,
            "memory": None if memory is None else {
                "level": memory_level, "available_mib": round(memory.available / MiB, 1),
                "total_mib": round(memory.total / MiB, 1), "swap_free_mib": round(memory.swap_free / MiB, 1),
                "psi_some_avg10": memory.psi_some_avg10, "psi_full_avg10": memory.psi_full_avg10},
            "worker_rss_mib": None if rss is None else round(rss / MiB, 1),
            # waiting requests; the scheduler thread owns the queue and keeps this gauge, so telemetry and
            # /metrics give the same number without reaching into the scheduler's state
            "queue_depth": int(m.registry.get_sample_value("appliance_queue_depth") or 0),
            "outstanding": self.scheduler.outstanding,  # accepted and unfinished: queued + running
            "tokens_per_s": round(self.scheduler.reporter.last_tokens_per_s, 2),
            "worker": {"threads": threads, "token_delay_s": delay},
        }
        for listener in self.reading_listeners:
            listener(self.telemetry)
        now = time.monotonic()
        interval = self.config.supervisor.telemetry_interval
        if self.publish_telemetry is not None and interval and now >= self._next_telemetry:
            self._next_telemetry = now + interval
            self.publish_telemetry(self.telemetry)
        if self.healthy():
            self.notifier.watchdog()

    def healthy(self) -> bool:
        """Alive and turning: what the systemd watchdog vouches for (not whether a model is loaded)."""
        fresh = time.monotonic() - self.scheduler.heartbeat < HEARTBEAT_LIMIT
        return self.scheduler.alive and fresh and self.extra_health()

    def _on_status(self, status: Status) -> None:
        line = f"{status.state}: {status.model or 'no model'}" + (f" ({status.reason})" if status.reason else "")
        if status.state not in ("starting", "loading"):
            self.notifier.ready(line)  # once: the service answers now (maybe with a reason it cannot serve)
        self.notifier.status(line)
        self.indicators.show(status.state, hot=self.conditions.thermal != "normal")
