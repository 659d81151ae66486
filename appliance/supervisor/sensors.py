"""Hardware readings for the supervisor: memory (meminfo, PSI), CPU temperature, Raspberry Pi throttle flags, and
the worker's RSS. Every path is configurable, which is how the tests drive the policies with fake files.

Nothing here decides anything; policies.py does, on the readings returned here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from appliance.config.schema import GpioConfig, MemoryConfig, ThermalConfig

log = logging.getLogger(__name__)

#: `vcgencmd get_throttled` bits (https://www.raspberrypi.com/documentation/computers/os.html#get_throttled)
THROTTLE_BITS = {
    0: "under_voltage", 1: "frequency_capped", 2: "throttled", 3: "soft_temperature_limit",
    16: "under_voltage_occurred", 17: "frequency_capped_occurred", 18: "throttled_occurred",
    19: "soft_temperature_limit_occurred",
}


@dataclass(frozen=True)
class MemoryReading:
    available: int  # bytes (MemAvailable: free + reclaimable page cache)
    total: int
    swap_free: int
    swap_total: int
    psi_some_avg10: float | None  # % of time some task stalled on memory, last 10 s; None without PSI
    psi_full_avg10: float | None  # % of time all tasks stalled


@dataclass(frozen=True)
class Throttle:
    raw: int

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(name for bit, name in THROTTLE_BITS.items() if self.raw & (1 << bit))


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per key."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)(?:\s+kB)?", line)
        if match:
            out[match.group(1)] = int(match.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def parse_psi(text: str) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) from ``/proc/pressure/memory``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(some|full)\s.*avg10=([\d.]+)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values.get("some"), values.get("full")


def parse_throttled(text: str) -> Throttle | None:
    match = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text)
    return Throttle(int(match.group(1), 0)) if match else None


class Sensors:
    def __init__(self, memory: MemoryConfig, thermal: ThermalConfig, gpio: GpioConfig) -> None:
        self.memory_config, self.thermal_config = memory, thermal
        self._temperature = _temperature_reader(thermal.sensor_file, gpio.pin_factory)
        self._throttle: Throttle | None = None
        self._throttle_read_at = 0.0
        self._vcgencmd_missing = not thermal.vcgencmd

    def memory(self) -> MemoryReading | None:
        try:
            info = parse_meminfo(self.memory_config.meminfo_path.read_text())
        except OSError:
            return None
        some = full = None
        with contextlib.suppress(OSError):  # no PSI (Pi kernels without psi=1): MemAvailable alone decides
            some, full = parse_psi(self.memory_config.psi_path.read_text())
        return MemoryReading(available=info.get("MemAvailable", info.get("MemFree", 0)), total=info.get("MemTotal", 0),
                             swap_free=info.get("SwapFree", 0), swap_total=info.get("SwapTotal", 0),
                             psi_some_avg10=some, psi_full_avg10=full)

    def temperature(self) -> float | None:
        return self._temperature()

    def throttle(self) -> Throttle | None:
        if self._vcgencmd_missing:
            return None
        now = time.monotonic()
        if now - self._throttle_read_at < self.thermal_config.throttle_interval and self._throttle_read_at:
            return self._throttle
        self._throttle_read_at = now
        try:
            result = subprocess.run([self.thermal_config.vcgencmd, "get_throttled"], capture_output=True, text=True,
                                    timeout=3, check=False)
            self._throttle = parse_throttled(result.stdout)
        except FileNotFoundError:
            log.info("no %s on this machine: throttle flags are not read", self.thermal_config.vcgencmd)
            self._vcgencmd_missing = True
            self._throttle = None
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s get_throttled failed: %s", self.thermal_config.vcgencmd, exc)
            self._throttle = None
        return self._throttle

    @staticmethod
    def process_rss(pid: int | None) -> int | None:
        if pid is None:
            return None
        try:
            return psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


def _temperature_reader(sensor_file: Path, pin_factory: str) -> Callable[[], float | None]:
    """gpiozero's CPUTemperature when gpiozero can run here; the plain file otherwise (x86 without GPIO)."""
    def from_file() -> float | None:
        try:
            return int(sensor_file.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            return None

    try:
        from gpiozero import CPUTemperature
        from gpiozero.exc import BadPinFactory

        from appliance.supervisor.indicators import make_pin_factory, quiet_fallbacks
        try:
            with quiet_fallbacks():
                device = CPUTemperature(sensor_file=str(sensor_file), pin_factory=make_pin_factory(pin_factory))
        except (BadPinFactory, OSError) as exc:
            log.debug("CPUTemperature unavailable (%s); reading %s directly", exc, sensor_file)
            return from_file
    except ImportError:
        return from_file

    def from_gpiozero() -> float | None:
        try:
            return float(device.temperature)
        except (OSError, ValueError):
            return None
    return from_gpiozero
