"""Home Assistant MQTT discovery: the device announces itself as one device with sensors, read from the retained status
and telemetry topics it already publishes, with availability tied to the status topic's Last Will.

One retained config per entity, ``<prefix>/<platform>/<node>/<key>/config`` (per-component discovery, understood by
every Home Assistant release that has MQTT discovery), all sharing one ``device`` block so Home Assistant groups
them. Announced on every connection to the broker and again, after a short random delay (a fleet of devices must not
answer at the same instant), whenever Home Assistant says ``online`` on its status topic; the status and the last
telemetry are published again after each announcement. The topics announced are remembered in the state directory,
so an entity dropped by a newer release, or the whole device when discovery is turned off, is withdrawn (an empty
retained config) instead of lingering in Home Assistant as "unavailable".
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Config
from appliance.status import STATES
from appliance.transports.mqtt_session import Topics

log = logging.getLogger(__name__)

ANNOUNCE_JITTER = 5.0  # seconds: the longest random wait between Home Assistant's `online` and the announcement
STATE_FILE = "homeassistant-discovery.json"
#: Home Assistant renders "None" as "unknown"; the templates say so when a reading is missing (no vcgencmd ...)
_AVAILABILITY = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"


@dataclass(frozen=True)
class Entity:
    key: str  # object id, and the last part of unique_id
    platform: str  # "sensor" or "binary_sensor"
    name: str
    source: str  # "status" or "telemetry": which retained topic the template reads
    template: str  # Home Assistant's value_template (Jinja, `value_json` is the parsed payload)
    options: dict[str, Any] = field(default_factory=dict)  # more discovery keys: device_class, unit_of_measurement ...


#: The table that drives both the announcements and the docs: one row per entity.
ENTITIES: tuple[Entity, ...] = (
    Entity("state", "sensor", "State", "status", "{{ value_json.state }}",
           {"device_class": "enum", "options": list(STATES), "icon": "mdi:robot"}),
    Entity("model", "sensor", "Model loaded", "status",
           "{% if value_json.state in ['ready', 'busy'] and value_json.model %}{{ value_json.model }}"
           "{% else %}none{% endif %}", {"icon": "mdi:brain"}),
    Entity("version", "sensor", "Version", "status", "{{ value_json.version }}",
           {"entity_category": "diagnostic", "icon": "mdi:package-variant"}),
    Entity("temperature", "sensor", "CPU temperature", "telemetry", "{{ value_json.temperature_c }}",
           {"device_class": "temperature", "unit_of_measurement": "°C", "state_class": "measurement",
            "suggested_display_precision": 1}),
    Entity("memory_available", "sensor", "Memory available", "telemetry",
           "{{ value_json.memory.available_mib if value_json.memory else None }}",
           {"device_class": "data_size", "unit_of_measurement": "MiB", "state_class": "measurement",
            "suggested_display_precision": 0}),
    Entity("throttle", "sensor", "Throttle flags", "telemetry",
           "{% if value_json.throttle %}{{ value_json.throttle.flags | join(', ') or 'none' }}{% else %}None"
           "{% endif %}", {"entity_category": "diagnostic", "icon": "mdi:speedometer-slow"}),
    Entity("tokens_per_second", "sensor", "Tokens per second", "telemetry", "{{ value_json.tokens_per_s }}",
           {"unit_of_measurement": "tok/s", "state_class": "measurement", "suggested_display_precision": 1,
            "icon": "mdi:speedometer"}),
    Entity("queue_depth", "sensor", "Queue depth", "telemetry", "{{ value_json.queue_depth }}",
           {"state_class": "measurement", "icon": "mdi:tray-full"}),
    Entity("under_voltage", "binary_sensor", "Under-voltage", "telemetry",
           "{% if value_json.throttle %}{{ 'ON' if 'under_voltage' in value_json.throttle.flags else 'OFF' }}"
           "{% else %}None{% endif %}", {"device_class": "problem"}),
)


def node_id(device: str) -> str:
    """Discovery topic ids allow only ``[a-zA-Z0-9_-]``; a device id may also hold '.'."""
    return "appliance_" + re.sub(r"[^a-zA-Z0-9_-]", "_", device)


def entity_object_id(node: str, key: str) -> str:
    """Entity ids allow only lowercase letters, digits and single '_' (sensor.appliance_pi_07_temperature)."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", f"{node}_{key}".lower())).strip("_")


def board_model(path: Path = Path("/proc/device-tree/model")) -> str | None:
    """'Raspberry Pi 4 Model B Rev 1.4' on a Pi; None elsewhere."""
    try:
        return path.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        return None


def discovery_configs(config: Config, topics: Topics, hardware: str | None = None) -> dict[str, dict[str, Any]]:
    """Every discovery topic and its config payload."""
    ha = config.homeassistant
    node = node_id(config.device.id)
    device = {"identifiers": [node], "name": ha.name or config.device.id, "manufacturer": "appliance project",
              "model": "Offline LLM appliance", "sw_version": __version__}
    if hardware:
        device["hw_version"] = hardware
    origin = {"name": "appliance", "sw_version": __version__}
    expire_after = max(60, math.ceil(3 * config.supervisor.telemetry_interval))
    out = {}
    for entity in ENTITIES:
        payload = {"name": entity.name, "unique_id": f"{node}_{entity.key}",
                   "default_entity_id": f"{entity.platform}.{entity_object_id(node, entity.key)}",
                   "state_topic": topics.status if entity.source == "status" else topics.telemetry,
                   "value_template": entity.template, **entity.options,
                   "availability_topic": topics.status, "availability_template": _AVAILABILITY,
                   "device": device, "origin": origin, "qos": 1}
        if entity.source == "telemetry":
            payload["expire_after"] = expire_after  # telemetry that stops coming is shown as unavailable
        out[f"{ha.prefix}/{entity.platform}/{node}/{entity.key}/config"] = payload
    return out


class Discovery:
    """Announces and withdraws the device; the MQTT transport calls :meth:`on_connect` and :meth:`on_birth`.

    ``publish(topic, payload, retain)`` publishes a dict as JSON, or withdraws with ``None`` (an empty retained
    message); ``republish_state()`` publishes the status and the last telemetry again."""

    def __init__(self, config: Config, topics: Topics, publish: Callable[[str, dict[str, Any] | None], object],
                 republish_state: Callable[[], None], hardware: str | None = None) -> None:
        self.enabled = config.homeassistant.discovery
        self.birth_topic = config.homeassistant_status_topic
        self.configs = discovery_configs(config, topics, hardware) if self.enabled else {}
        self._publish = publish
        self._republish_state = republish_state
        self._record = config.device.state_dir / STATE_FILE
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._closed = False

    def on_connect(self) -> None:
        """Withdraw what an earlier run announced and this one does not, then announce (paho's network thread)."""
        announced = self._read_record()
        for topic in sorted(announced - set(self.configs)):
            log.info("Home Assistant discovery: withdrawing %s", topic)
            self._publish(topic, None)
        if self.enabled:
            self.announce()
        if announced != set(self.configs):
            self._write_record()

    def on_birth(self, payload: bytes) -> None:
        """Home Assistant (re)started: announce again after a random delay of up to ANNOUNCE_JITTER seconds."""
        if not self.enabled or payload.strip() != b"online":
            return
        with self._lock:
            if self._closed or (self._timer is not None and self._timer.is_alive()):
                return  # one announcement is already on its way; a flood of births cannot postpone it
            self._timer = threading.Timer(random.uniform(0, ANNOUNCE_JITTER), self.announce)
            self._timer.daemon = True
            self._timer.start()

    def announce(self) -> None:
        if self._closed:
            return
        for topic, payload in self.configs.items():
            self._publish(topic, payload)
        self._republish_state()  # Home Assistant reads state only after it has the config
        log.info("Home Assistant discovery: announced %d entities", len(self.configs))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()

    def _read_record(self) -> set[str]:
        try:
            topics = json.loads(self._record.read_text())
            return {t for t in topics if isinstance(t, str)} if isinstance(topics, list) else set()
        except (OSError, ValueError):
            return set()

    def _write_record(self) -> None:
        try:
            if self.configs:
                self._record.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._record.with_suffix(".tmp")
                tmp.write_text(json.dumps(sorted(self.configs)))
                tmp.replace(self._record)
            else:
                self._record.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("Home Assistant discovery: cannot record the announced topics in %s: %s", self._record,
                        exc.strerror)
