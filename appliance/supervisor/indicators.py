"""GPIO through gpiozero: a status LED pattern per state, a PWM fan curve, a shutdown button.

On a machine without GPIO (x86, a container) and ``gpio.enabled = "auto"`` everything here quietly does nothing.
Tests use gpiozero's MockFactory (``gpio.pin_factory = "mock"``) and read the mock pins.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from appliance.config.schema import GpioConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

#: (on seconds, off seconds) for blinking; "on"/"off" for steady
LED_PATTERNS: dict[str, tuple[float, float] | str] = {
    "starting": (0.2, 0.2), "loading": (0.2, 0.2), "ready": "on", "busy": (1.0, 1.0), "hot": (0.1, 0.9),
    "degraded": (0.5, 0.5), "error": (0.05, 0.05), "offline": "off",
}
FAN_HYSTERESIS = 2.0  # °C the temperature must fall below a curve point before the fan slows down


@contextlib.contextmanager
def quiet_fallbacks() -> Iterator[None]:
    """gpiozero warns for every pin library it tries and cannot load; on a board without GPIO that is expected."""
    with warnings.catch_warnings():
        with contextlib.suppress(ImportError):
            from gpiozero.exc import PinFactoryFallback
            warnings.simplefilter("ignore", PinFactoryFallback)
        yield


def make_pin_factory(name: str) -> Any:
    """A gpiozero pin factory by name; None means gpiozero's own choice."""
    if not name:
        return None
    if name == "mock":
        from gpiozero.pins.mock import MockFactory, MockPWMPin
        return MockFactory(pin_class=MockPWMPin)
    from importlib.metadata import entry_points
    for entry in entry_points(group="gpiozero_pin_factories"):
        if entry.name == name:
            return entry.load()()
    raise ConfigError([f"gpio.pin_factory = {name!r}: no such gpiozero pin factory"])


def parse_fan_curve(text: str) -> list[tuple[float, float]]:
    points = [point.split(":") for point in text.split(",") if point.strip()]
    return [(float(celsius), float(speed)) for celsius, speed in points]


def fan_speed(curve: list[tuple[float, float]], celsius: float, previous: float) -> float:
    """Speed for ``celsius`` by the curve's steps; on the way down a step holds until FAN_HYSTERESIS below it."""
    def step(t: float) -> float:
        return max((speed for point, speed in curve if t >= point), default=0.0)
    wanted = step(celsius)
    return wanted if wanted >= previous else max(wanted, min(previous, step(celsius + FAN_HYSTERESIS)))


class Indicators:
    def __init__(self, config: GpioConfig, pin_factory: Any = None) -> None:
        self.config = config
        self.factory = None
        self.led = self.fan = self.button = None
        self.pattern = ""
        self._fan_speed = 0.0
        self._curve = parse_fan_curve(config.fan_curve)
        # Status changes arrive from several threads (worker, monitors, MQTT). gpiozero's blink() is not safe to
        # call from two at once: one stops the blink thread the other has made but not yet started.
        self._lock = threading.Lock()
        wanted = [config.status_led, config.fan_pin, config.shutdown_button]
        if config.enabled == "false" or not any(wanted):
            return
        try:
            import gpiozero
            from gpiozero.exc import GPIOZeroError
        except ImportError as exc:
            self._unavailable(exc)
            return
        try:
            with quiet_fallbacks():
                self._open_devices(gpiozero, pin_factory)
        except (GPIOZeroError, OSError) as exc:
            self.close()
            self._unavailable(exc)

    def _open_devices(self, gpiozero: Any, pin_factory: Any) -> None:
        config = self.config
        self.factory = pin_factory or make_pin_factory(config.pin_factory)
        if config.status_led:
            self.led = gpiozero.LED(config.status_led, pin_factory=self.factory)
        if config.fan_pin:
            self.fan = gpiozero.PWMOutputDevice(config.fan_pin, pin_factory=self.factory)
        if config.shutdown_button:
            button = gpiozero.Button(config.shutdown_button, hold_time=config.shutdown_hold, pin_factory=self.factory)
            button.when_held = self._shutdown
            self.button = button

    def _unavailable(self, exc: Exception) -> None:
        if self.config.enabled == "true":
            raise ConfigError([f"gpio.enabled = true but GPIO is not usable here: {exc}"]) from None
        log.info("no GPIO on this machine (%s): no status LED, fan or shutdown button", exc)

    def show(self, state: str, hot: bool) -> None:
        """Set the LED pattern for a status state ("hot" wins while the board is above its soft limit)."""
        pattern = "hot" if hot and state not in ("error", "offline") else state
        with self._lock:
            if self.led is None or pattern == self.pattern:
                return
            shape = LED_PATTERNS.get(pattern, "off")
            if shape == "on":
                self.led.on()
            elif shape == "off":
                self.led.off()
            else:
                self.led.blink(on_time=shape[0], off_time=shape[1], background=True)
            # Only once the LED shows it: readers on other threads (status, tests) take `pattern` as what is lit.
            self.pattern = pattern

    def set_temperature(self, celsius: float | None) -> None:
        with self._lock:
            if self.fan is None or celsius is None:
                return
            speed = fan_speed(self._curve, celsius, self._fan_speed)
            if speed != self._fan_speed:
                log.info("fan %.0f%% at %.1f °C", speed * 100, celsius)
                self._fan_speed = speed
                self.fan.value = speed

    def _shutdown(self) -> None:
        log.warning("shutdown button held for %.1f s: running %r", self.config.shutdown_hold,
                    self.config.shutdown_command)
        try:
            subprocess.Popen(shlex.split(self.config.shutdown_command), start_new_session=True)
        except OSError as exc:
            log.error("shutdown command failed: %s", exc)

    def close(self) -> None:
        with self._lock:
            for device in (self.led, self.fan, self.button):
                if device is not None:
                    device.close()
            self.led = self.fan = self.button = None
