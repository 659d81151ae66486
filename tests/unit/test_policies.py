"""Memory and thermal policies: every level, entered at its threshold, left only past the hysteresis."""

from __future__ import annotations

import pytest

from appliance.backends.probe import MiB
from appliance.config.schema import MemoryConfig, ThermalConfig
from appliance.supervisor.indicators import fan_speed, parse_fan_curve
from appliance.supervisor.policies import MemoryPolicy, ThermalPolicy, throttle_warnings
from appliance.supervisor.sensors import MemoryReading, Throttle, parse_meminfo, parse_psi, parse_throttled


def reading(available_mib: float, some: float | None = None, full: float | None = None) -> MemoryReading:
    return MemoryReading(int(available_mib * MiB), 4096 * MiB, 0, 0, some, full)


@pytest.mark.parametrize("steps", [
    # (MemAvailable MiB, expected level) with low 256, critical 96, hysteresis 64
    [(1000, "normal"), (300, "normal"), (250, "low"), (300, "low"), (319, "low"), (321, "normal")],
    [(1000, "normal"), (90, "critical"), (150, "critical"), (161, "low"), (200, "low"), (400, "normal")],
    [(90, "critical"), (2000, "normal"), (255, "low"), (95, "critical")],
])
def test_memory_levels_with_hysteresis(steps):
    policy = MemoryPolicy(MemoryConfig(low_mib=256, critical_mib=96, hysteresis_mib=64))
    for available, expected in steps:
        level, reason = policy.update(reading(available))
        assert level == expected, (available, level)
        assert (reason == "") == (level == "normal")
        if level != "normal":
            assert f"{available} MiB available" in reason and "memory." in reason


def test_memory_pressure_levels():
    policy = MemoryPolicy(MemoryConfig(psi_low=40, psi_critical=30, psi_hysteresis=10))
    assert policy.update(reading(4000, some=45.0, full=0.0))[0] == "low"
    assert policy.update(reading(4000, some=35.0, full=0.0))[0] == "low"  # within hysteresis
    assert policy.update(reading(4000, some=29.0, full=0.0))[0] == "normal"
    level, reason = policy.update(reading(4000, some=50.0, full=31.0))
    assert level == "critical" and "PSI full avg10 31.0%" in reason
    assert policy.update(reading(4000, some=0.0, full=None))[0] == "normal"  # no PSI: MemAvailable decides
    assert policy.update(None)[0] == "normal"  # no reading: keep the level


@pytest.mark.parametrize("steps", [
    [(60, "normal"), (75, "soft"), (71, "soft"), (69.9, "normal")],
    [(60, "normal"), (85, "hard"), (78, "hard"), (76.9, "soft"), (70.5, "soft"), (69, "normal")],
    [(82, "hard"), (40, "normal")],
])
def test_thermal_levels_with_hysteresis(steps):
    policy = ThermalPolicy(ThermalConfig(soft_limit=75, hard_limit=82, hysteresis=5))
    for celsius, expected in steps:
        level, reason = policy.update(celsius)
        assert level == expected, (celsius, level)
    if level == "hard":
        assert "below 77 °C" in reason


def test_sensor_file_parsing():
    info = parse_meminfo("MemTotal:        3884412 kB\nMemAvailable:    2911232 kB\nHugePages_Total:       0\n")
    assert info["MemAvailable"] == 2911232 * 1024 and info["HugePages_Total"] == 0
    assert parse_psi("some avg10=1.50 avg60=0.10 avg300=0.00 total=1\nfull avg10=0.25 avg60=0 avg300=0 total=1\n") \
        == (1.5, 0.25)
    assert parse_psi("") == (None, None)
    assert parse_throttled("throttled=0x50005\n").raw == 0x50005
    assert parse_throttled("error=1 error_msg=\"Command not registered\"") is None


def test_throttle_flags_and_warnings():
    flags = Throttle(0x50005).flags
    assert flags == ("under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred")
    assert throttle_warnings(Throttle(0x50005)) == ("under-voltage now: the power supply is too weak",
                                                   "the firmware is throttling the CPU")
    assert throttle_warnings(Throttle(0x10000)) == ("under-voltage has occurred since boot",)
    assert throttle_warnings(Throttle(0x8)) == ("the firmware's soft temperature limit is active",)
    assert throttle_warnings(Throttle(0)) == () and throttle_warnings(None) == ()


def test_fan_curve_steps_with_hysteresis():
    curve = parse_fan_curve("50:0.3,60:0.5,67.5:0.7,75:1.0")
    speed = 0.0
    for celsius, expected in [(40, 0.0), (52, 0.3), (61, 0.5), (59, 0.5), (57.9, 0.3), (80, 1.0), (74, 1.0),
                              (72, 0.7), (30, 0.0)]:
        speed = fan_speed(curve, celsius, speed)
        assert speed == expected, celsius
