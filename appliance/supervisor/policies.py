"""Memory and thermal policies: readings in, a level with a reason out, with hysteresis. Pure logic, no I/O.

A level is entered at its threshold and left only once the reading is ``hysteresis`` back on the safe side, so a
board hovering at a limit does not flap between states (and its status LED does not flicker).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.backends.probe import MiB
from appliance.config.schema import MemoryConfig, ThermalConfig
from appliance.supervisor.sensors import MemoryReading, Throttle

MEMORY_LEVELS = ("normal", "low", "critical")
THERMAL_LEVELS = ("normal", "soft", "hard")


@dataclass(frozen=True)
class Conditions:
    """What the supervisor tells the scheduler: how much it may do now, and why not more."""

    memory: str = "normal"
    memory_reason: str = ""
    thermal: str = "normal"
    thermal_reason: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def status_warnings(self) -> tuple[str, ...]:
        """Everything a status shows while still serving: these warnings, low memory, a warm board."""
        return (*self.warnings, *([self.memory_reason] if self.memory == "low" else []),
                *([self.thermal_reason] if self.thermal == "soft" else []))


def _settle(levels: tuple[str, ...], current: str, entered: str, held: str) -> str:
    """The new level: at least what the thresholds say (``entered``), and the current one kept while the reading
    is within hysteresis of it (``held``)."""
    rank = levels.index
    return levels[max(rank(entered), min(rank(current), rank(held)))]


class MemoryPolicy:
    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self.level = "normal"
        self.reason = ""

    def _level(self, reading: MemoryReading, slack_mib: float, slack_psi: float) -> tuple[str, str]:
        c = self.config
        available = reading.available / MiB
        some, full = reading.psi_some_avg10, reading.psi_full_avg10
        if available < c.critical_mib + slack_mib:
            return "critical", (f"memory critical: {available:.0f} MiB available "
                                f"(memory.critical_mib = {c.critical_mib})")
        if full is not None and full > c.psi_critical - slack_psi:
            return "critical", f"memory pressure critical: PSI full avg10 {full:.1f}% (memory.psi_critical = " \
                               f"{c.psi_critical:g})"
        if available < c.low_mib + slack_mib:
            return "low", f"memory low: {available:.0f} MiB available (memory.low_mib = {c.low_mib})"
        if some is not None and some > c.psi_low - slack_psi:
            return "low", f"memory pressure: PSI some avg10 {some:.1f}% (memory.psi_low = {c.psi_low:g})"
        return "normal", ""

    def update(self, reading: MemoryReading | None) -> tuple[str, str]:
        if reading is None:
            return self.level, self.reason
        entered, entered_reason = self._level(reading, 0, 0)
        held, held_reason = self._level(reading, self.config.hysteresis_mib, self.config.psi_hysteresis)
        level = _settle(MEMORY_LEVELS, self.level, entered, held)
        self.level = level
        self.reason = entered_reason if level == entered else held_reason
        return self.level, self.reason


class ThermalPolicy:
    def __init__(self, config: ThermalConfig) -> None:
        self.config = config
        self.level = "normal"
        self.reason = ""

    def _level(self, celsius: float, slack: float) -> str:
        if celsius >= self.config.hard_limit - slack:
            return "hard"
        if celsius >= self.config.soft_limit - slack:
            return "soft"
        return "normal"

    def update(self, celsius: float | None) -> tuple[str, str]:
        if celsius is None:
            return self.level, self.reason
        c = self.config
        self.level = _settle(THERMAL_LEVELS, self.level, self._level(celsius, 0), self._level(celsius, c.hysteresis))
        if self.level == "hard":
            self.reason = (f"too hot: {celsius:.1f} °C (thermal.hard_limit = {c.hard_limit:g}); generation paused "
                           f"until below {c.hard_limit - c.hysteresis:g} °C")
        elif self.level == "soft":
            self.reason = f"warm: {celsius:.1f} °C (thermal.soft_limit = {c.soft_limit:g}); generating slower"
        else:
            self.reason = ""
        return self.level, self.reason


def throttle_warnings(throttle: Throttle | None) -> tuple[str, ...]:
    """Status warnings from the Raspberry Pi firmware's flags."""
    if throttle is None:
        return ()
    flags = set(throttle.flags)
    out = []
    if "under_voltage" in flags:
        out.append("under-voltage now: the power supply is too weak")
    elif "under_voltage_occurred" in flags:
        out.append("under-voltage has occurred since boot")
    if flags & {"throttled", "frequency_capped"}:
        out.append("the firmware is throttling the CPU")
    if "soft_temperature_limit" in flags:
        out.append("the firmware's soft temperature limit is active")
    return tuple(out)
