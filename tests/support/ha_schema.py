"""Home Assistant's MQTT discovery schema for the platforms the appliance announces, transcribed for the tests.

Sources (home-assistant/core, homeassistant/components/mqtt/): ``discovery.py`` (topic pattern), ``config.py``
(MQTT_BASE_SCHEMA, MQTT_RO_SCHEMA), ``schemas.py`` (availability, device, origin, MQTT_ENTITY_COMMON_SCHEMA),
``sensor.py`` (DISCOVERY_SCHEMA and ``validate_sensor_state_and_device_class_config``), ``binary_sensor.py``;
``components/sensor/const.py`` (device classes, DEVICE_CLASS_UNITS, DEVICE_CLASS_STATE_CLASSES) and
``components/binary_sensor/__init__.py`` (device classes). The docs: integrations/sensor.mqtt and
binary_sensor.mqtt, "MQTT discovery".

Stricter than Home Assistant in one way, on purpose: HA drops unknown keys silently (``extra=REMOVE_EXTRA``), so a
misspelt key would simply not work there; here it is an error. Types are checked as HA's validators accept them
(``cv.string`` also takes numbers, but the appliance should send strings, so strings are required).
"""

from __future__ import annotations

import re

TOPIC = re.compile(r"^(?P<prefix>.+?)/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                   r"(?P<object_id>[a-zA-Z0-9_-]+)/config$")

#: homeassistant/core.py VALID_ENTITY_ID
ENTITY_ID = re.compile(r"^(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)$")
SENSOR_DEVICE_CLASSES = {
    "apparent_power", "aqi", "area", "atmospheric_pressure", "battery", "blood_glucose_concentration", "co", "co2",
    "conductivity", "current", "data_rate", "data_size", "date", "distance", "duration", "energy", "energy_distance",
    "energy_storage", "enum", "frequency", "gas", "humidity", "illuminance", "irradiance", "moisture", "monetary",
    "nitrogen_dioxide", "nitrogen_monoxide", "nitrous_oxide", "ozone", "ph", "pm1", "pm10", "pm25", "power_factor",
    "power", "precipitation", "precipitation_intensity", "pressure", "reactive_power", "signal_strength",
    "sound_pressure", "speed", "sulphur_dioxide", "temperature", "timestamp", "volatile_organic_compounds",
    "volatile_organic_compounds_parts", "voltage", "volume", "volume_flow_rate", "volume_storage", "water", "weight",
    "wind_direction", "wind_speed"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
#: DEVICE_CLASS_UNITS for the classes the appliance uses (UnitOfTemperature, UnitOfInformation)
DEVICE_CLASS_UNITS = {
    "temperature": {"°C", "°F", "K"},
    "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB", "KiB", "MiB",
                  "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"},
}
#: DEVICE_CLASS_STATE_CLASSES for the same classes
DEVICE_CLASS_STATE_CLASSES = {"temperature": {"measurement"}, "data_size": STATE_CLASSES, "enum": set()}
BINARY_SENSOR_DEVICE_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window"}
ENTITY_CATEGORIES = {"config", "diagnostic"}

DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
               "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
# MQTT_BASE_SCHEMA + MQTT_RO_SCHEMA + MQTT_ENTITY_COMMON_SCHEMA (availability included)
COMMON_KEYS = {"qos", "encoding", "group", "state_topic", "value_template", "availability_topic",
               "availability_template", "payload_available", "payload_not_available", "availability_mode",
               "availability", "device", "entity_picture", "origin", "enabled_by_default", "entity_category", "icon",
               "json_attributes_topic", "json_attributes_template", "default_entity_id", "object_id",
               "message_expiry_interval", "unique_id", "visible_by_default"}
PLATFORM_KEYS = {
    "sensor": COMMON_KEYS | {"device_class", "expire_after", "force_update", "last_reset_value_template", "name",
                             "options", "suggested_display_precision", "state_class", "unit_of_measurement"},
    "binary_sensor": COMMON_KEYS | {"device_class", "expire_after", "force_update", "name", "off_delay",
                                    "payload_off", "payload_on"},
}


def valid_subscribe_topic(topic: object) -> str | None:
    """mqtt/util.py valid_subscribe_topic (with valid_topic)."""
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty string"
    if len(topic.encode()) > 65535 or "\0" in topic:
        return "too long or holds a null character"
    for i, level in enumerate(topic.split("/")):
        if "+" in level and level != "+":
            return "'+' must occupy a whole level"
        if "#" in level and (level != "#" or i != len(topic.split("/")) - 1):
            return "'#' must be the last level, alone"
    return None


def _is_template(value: object) -> bool:
    return isinstance(value, str) and value.count("{{") == value.count("}}") and \
        value.count("{%") == value.count("%}")


def validate(topic: str, payload: dict) -> list[str]:
    """Every way ``payload`` on ``topic`` falls short of Home Assistant's discovery schema (empty: it is valid)."""
    match = TOPIC.match(topic)
    if not match:
        return [f"{topic}: not <prefix>/<component>/[<node_id>/]<object_id>/config with ids of [a-zA-Z0-9_-]"]
    platform = match["component"]
    if platform not in PLATFORM_KEYS:
        return [f"{topic}: this validator knows only {sorted(PLATFORM_KEYS)}"]
    if not isinstance(payload, dict):
        return ["payload is not a JSON object"]
    errors = [f"unknown key {k!r} (Home Assistant would drop it silently)" for k in payload
              if k not in PLATFORM_KEYS[platform]]
    p = payload

    def string(key: str, *, nullable: bool = False) -> None:
        if key in p and not (isinstance(p[key], str) or (nullable and p[key] is None)):
            errors.append(f"{key}: must be a string")

    def positive_int(key: str) -> None:
        if key in p and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 0):
            errors.append(f"{key}: must be a positive integer")

    def boolean(key: str) -> None:
        if key in p and not isinstance(p[key], bool):
            errors.append(f"{key}: must be true or false")

    def template(key: str) -> None:
        if key in p and not _is_template(p[key]):
            errors.append(f"{key}: must be a template string")

    # MQTT_RO_SCHEMA
    if "state_topic" not in p:
        errors.append("state_topic: required")
    elif problem := valid_subscribe_topic(p["state_topic"]):
        errors.append(f"state_topic: {problem}")
    template("value_template")
    if "qos" in p and p["qos"] not in (0, 1, 2):
        errors.append("qos: must be 0, 1 or 2")
    string("encoding")
    # availability: availability_topic and availability are exclusive
    if "availability_topic" in p and "availability" in p:
        errors.append("availability_topic and availability: use one, not both")
    if "availability_topic" in p and (problem := valid_subscribe_topic(p["availability_topic"])):
        errors.append(f"availability_topic: {problem}")
    template("availability_template")
    string("payload_available")
    string("payload_not_available")
    if "availability_mode" in p and p["availability_mode"] not in ("all", "any", "latest"):
        errors.append("availability_mode: must be all, any or latest")
    for i, entry in enumerate(p.get("availability", []) if isinstance(p.get("availability", []), list) else [None]):
        if not isinstance(entry, dict) or "topic" not in entry or valid_subscribe_topic(entry["topic"]):
            errors.append(f"availability[{i}]: needs a valid topic")
    # entity common
    if "device" in p:
        errors += [f"device: {e}" for e in _device_errors(p["device"])]
    if "origin" in p:
        errors += [f"origin: {e}" for e in _origin_errors(p["origin"])]
    boolean("enabled_by_default")
    boolean("visible_by_default")
    if "entity_category" in p and p["entity_category"] not in ENTITY_CATEGORIES:
        errors.append(f"entity_category: must be one of {sorted(ENTITY_CATEGORIES)}")
    if "icon" in p and not (isinstance(p["icon"], str) and re.fullmatch(r"[a-z0-9_-]+:[a-z0-9_-]+", p["icon"])):
        errors.append("icon: must be prefix:name, e.g. mdi:robot")  # cv.icon
    for key in ("unique_id", "default_entity_id", "object_id"):
        string(key)
    if "default_entity_id" in p and isinstance(p["default_entity_id"], str) and \
            not (p["default_entity_id"].startswith(platform + ".") and ENTITY_ID.match(p["default_entity_id"])):
        errors.append(f"default_entity_id: must be a valid entity id {platform}.<lowercase letters, digits, _>")
    string("name", nullable=True)
    positive_int("expire_after")
    boolean("force_update")
    if platform == "sensor":
        errors += _sensor_errors(p, positive_int)
    else:
        positive_int("off_delay")
        string("payload_on")
        string("payload_off")
        if p.get("device_class") not in BINARY_SENSOR_DEVICE_CLASSES | {None}:
            errors.append(f"device_class: {p['device_class']!r} is not a binary_sensor device class")
    return errors


def _sensor_errors(p: dict, positive_int) -> list[str]:
    errors = []
    device_class, state_class, unit = p.get("device_class"), p.get("state_class"), p.get("unit_of_measurement")
    if device_class not in SENSOR_DEVICE_CLASSES | {None}:
        errors.append(f"device_class: {device_class!r} is not a sensor device class")
    if state_class not in STATE_CLASSES | {None}:
        errors.append(f"state_class: {state_class!r} is not a state class")
    if unit is not None and not isinstance(unit, str):
        errors.append("unit_of_measurement: must be a string")
    positive_int("suggested_display_precision")
    # validate_sensor_state_and_device_class_config
    if "last_reset_value_template" in p and state_class != "total":
        errors.append("last_reset_value_template: only with state_class total")
    if "options" in p:
        options = p["options"]
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            errors.append("options: must be a non-empty list of strings")
        if state_class or unit:
            errors.append("options: not allowed together with state_class or unit_of_measurement")
        if device_class != "enum":
            errors.append("options: must be used with device_class enum")
    if device_class in DEVICE_CLASS_UNITS and unit not in DEVICE_CLASS_UNITS[device_class]:
        errors.append(f"unit_of_measurement: {unit!r} is not a unit of device class {device_class}")
    if state_class and device_class in DEVICE_CLASS_STATE_CLASSES and \
            state_class not in DEVICE_CLASS_STATE_CLASSES[device_class]:
        errors.append(f"state_class: {state_class!r} does not go with device class {device_class}")
    return errors


def _device_errors(device: object) -> list[str]:
    if not isinstance(device, dict):
        return ["must be an object"]
    errors = [f"unknown key {k!r}" for k in device if k not in DEVICE_KEYS]
    ids = device.get("identifiers", [])
    ids = [ids] if isinstance(ids, str) else ids  # cv.ensure_list
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        errors.append("identifiers: must be a list of strings")
    if not ids and not device.get("connections"):
        errors.append("needs at least one of identifiers and connections")
    for key in DEVICE_KEYS - {"identifiers", "connections"}:
        if key in device and not isinstance(device[key], str):
            errors.append(f"{key}: must be a string")
    if "configuration_url" in device and not re.match(r"^(https?://|homeassistant://)", device["configuration_url"]):
        errors.append("configuration_url: must be an http(s) or homeassistant:// URL")
    return errors


def _origin_errors(origin: object) -> list[str]:
    if not isinstance(origin, dict):
        return ["must be an object"]
    errors = [f"unknown key {k!r}" for k in origin if k not in ORIGIN_KEYS]
    if not isinstance(origin.get("name"), str):
        errors.append("name: required, a string")
    for key in ("sw_version", "support_url"):
        if key in origin and not isinstance(origin[key], str):
            errors.append(f"{key}: must be a string")
    return errors
