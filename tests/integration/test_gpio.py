"""Status LED, fan and shutdown button through gpiozero's MockFactory, driven by a real service in this process
(real worker, real model, fake sensor files)."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.config.schema import GpioConfig
from appliance.supervisor.indicators import LED_PATTERNS, Indicators
from tests.support.harness import FakeBoard, in_process_service, merge


def _wait(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def _blink_timing(pin, seconds: float = 2.5) -> tuple[float, float]:
    """(median on time, median off time) of a mock pin over a while. A MockPin records each change with the time
    since the previous one, that is, how long the previous state lasted."""
    start = len(pin.states)
    time.sleep(seconds)
    changes = pin.states[start:]
    pairs = list(zip(changes, changes[1:], strict=False))
    on = [after.timestamp for before, after in pairs if before.state]
    off = [after.timestamp for before, after in pairs if not before.state]
    assert on and off, f"the LED did not blink: {changes}"
    return sorted(on)[len(on) // 2], sorted(off)[len(off) // 2]


def test_led_fan_and_button_follow_the_service(tmp_path, catalog_path):
    board = FakeBoard(tmp_path / "board")
    service = in_process_service(tmp_path, catalog_path, merge(board.overrides(), {
        "thermal": {"soft_limit": 70, "hard_limit": 80, "vcgencmd": ""},
        "gpio": {"status_led": "GPIO17", "fan_pin": "GPIO18", "shutdown_button": "GPIO27", "shutdown_hold": 0.3,
                 "shutdown_command": f"touch {tmp_path / 'powered-off'}"},
    }))
    try:
        service.start()
        factory = service.indicators.factory
        led, fan, button = factory.pin("GPIO17"), factory.pin("GPIO18"), factory.pin("GPIO27")
        _wait(lambda: service.indicators.pattern == "ready")
        assert led.state == 1, "ready: steady on"
        assert fan.state == 0, "45 °C: fan off"

        board.set_temperature(62)  # warmer, still below the soft limit: fan on the 60 °C step, LED unchanged
        _wait(lambda: fan.state == pytest.approx(0.5))
        assert service.indicators.pattern == "ready"

        board.set_temperature(75)  # above the soft limit
        _wait(lambda: service.indicators.pattern == "hot")
        on, off = _blink_timing(led)
        assert on == pytest.approx(LED_PATTERNS["hot"][0], abs=0.05)
        assert off == pytest.approx(LED_PATTERNS["hot"][1], abs=0.1)
        assert fan.state == pytest.approx(1.0)

        board.set_temperature(45)
        _wait(lambda: service.indicators.pattern == "ready" and fan.state == 0)
        assert led.state == 1

        button.drive_low()  # pressed (it pulls the pin to ground) and held
        _wait(lambda: (tmp_path / "powered-off").exists(), timeout=5)
        button.drive_high()
    finally:
        service.close()
    assert led.state == 0, "offline: off"


def test_patterns_for_every_state():
    from gpiozero.pins.mock import MockFactory, MockPWMPin
    factory = MockFactory(pin_class=MockPWMPin)
    indicators = Indicators(GpioConfig(status_led="GPIO5", enabled="true"), pin_factory=factory)
    led = factory.pin("GPIO5")
    indicators.show("ready", hot=False)
    assert led.state == 1
    for state in ("loading", "busy", "degraded", "error"):
        indicators.show(state, hot=False)
        on, off = _blink_timing(led, seconds=max(1.2, 4 * sum(LED_PATTERNS[state])))
        assert on == pytest.approx(LED_PATTERNS[state][0], abs=0.05), state
        assert off == pytest.approx(LED_PATTERNS[state][1], abs=0.05), state
    indicators.show("error", hot=True)
    assert indicators.pattern == "error", "error wins over hot"
    indicators.show("offline", hot=False)
    assert led.state == 0
    indicators.close()


def test_status_changes_from_many_threads_at_once():
    """The worker, the monitors and MQTT each report status on their own thread; gpiozero's blink() alone fails
    when two threads call it together ("cannot join thread before it is started")."""
    from gpiozero.pins.mock import MockFactory, MockPWMPin
    factory = MockFactory(pin_class=MockPWMPin)
    indicators = Indicators(GpioConfig(status_led="GPIO6", fan_pin="GPIO13", enabled="true"), pin_factory=factory)
    errors = []

    def report(states, temperatures):
        for i in range(150):
            try:
                indicators.show(states[i % 2], hot=False)
                indicators.set_temperature(temperatures[i % 2])
            except Exception as exc:  # noqa: BLE001 - any of them is the failure this test is about
                errors.append(repr(exc))

    threads = [threading.Thread(target=report, args=(("busy", "loading") if k % 2 else ("loading", "degraded"),
                                                      (50.0, 75.0) if k % 2 else (65.0, 85.0)))
               for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        indicators.show("error", hot=False)
        on, off = _blink_timing(factory.pin("GPIO6"), seconds=max(1.2, 4 * sum(LED_PATTERNS["error"])))
        assert on == pytest.approx(LED_PATTERNS["error"][0], abs=0.05), "and the LED still blinks as it should"
    finally:
        indicators.close()


def test_no_gpio_here_means_no_gpio_features():
    indicators = Indicators(GpioConfig(status_led="GPIO17", fan_pin="GPIO18"))
    assert (indicators.led, indicators.fan, indicators.button) == (None, None, None)  # x86: no pin library, no error
    indicators.show("ready", hot=False)
    indicators.set_temperature(90)
    indicators.close()
