"""Home Assistant MQTT discovery against a real mosquitto: every payload checked against Home Assistant's discovery
schema for its platform (tests/support/ha_schema.py), its templates rendered with Jinja on the real retained status
and telemetry, availability following the Last Will, re-announcement on Home Assistant's birth message, off by
default, withdrawn when turned off, and the shipped ACL with an account made at first boot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2.sandbox
import pytest

from appliance import __version__
from appliance.status import STATES
from tests.support import ha_schema
from tests.support.harness import FakeBoard, MqttClient, merge
from tests.support.scratch_device import device_broker, firstboot, scratch_device

EXPECTED = {("sensor", "state"), ("sensor", "model"), ("sensor", "version"), ("sensor", "temperature"),
            ("sensor", "memory_available"), ("sensor", "throttle"), ("sensor", "tokens_per_second"),
            ("sensor", "queue_depth"), ("binary_sensor", "under_voltage")}
UNDER_VOLTAGE_AND_THROTTLED = 0x50005  # vcgencmd bits 0, 2 (now) and 16, 18 (since boot)


def node(device_id: str) -> str:
    return "appliance_" + device_id


def render(template: str, payload: bytes) -> str:
    """As Home Assistant renders a value_template: Jinja, with `value_json` the parsed payload."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(value_json=json.loads(payload), value=payload.decode()).strip()


def discovery_configs(client: MqttClient, device_id: str, *, prefix: str = "homeassistant",
                      timeout: float = 30) -> dict[str, dict]:
    """Subscribe as Home Assistant does and collect this device's retained configs."""
    client.subscribe(f"{prefix}/+/{node(device_id)}/+/config")
    client.wait_for(lambda m: m.topic.startswith(f"{prefix}/") and m.payload, timeout=timeout, count=len(EXPECTED))
    latest = {m.topic: m.payload for m in client.messages if m.topic.endswith("/config")}
    return {topic: json.loads(payload) for topic, payload in latest.items() if payload}


def retained(client: MqttClient, topic: str, predicate=lambda body: True, timeout: float = 30) -> bytes:
    client.subscribe(topic)
    found = client.wait_for(lambda m: m.topic == topic and m.payload and predicate(json.loads(m.payload)), timeout)
    return found[-1].payload


def test_one_device_whose_every_payload_home_assistant_accepts(appliance_factory, mqtt_client, tmp_path):
    board = FakeBoard(tmp_path / "board")
    board.set_throttled(UNDER_VOLTAGE_AND_THROTTLED)
    app = appliance_factory(overrides=merge(board.overrides(), {"homeassistant": {"discovery": True}}),
                            env=board.env())
    ha = mqtt_client()
    configs = discovery_configs(ha, app.device)

    assert {(t.split("/")[1], t.split("/")[3]) for t in configs} == EXPECTED
    for topic, payload in configs.items():
        assert ha_schema.validate(topic, payload) == [], topic
        assert ha.messages[[m.topic for m in ha.messages].index(topic)].retain, "configs are retained"
    devices = {json.dumps(p["device"], sort_keys=True) for p in configs.values()}
    assert len(devices) == 1, "one device"
    announced = json.loads(devices.pop())
    assert announced["identifiers"] == [node(app.device)] and announced["sw_version"] == __version__
    assert len({p["unique_id"] for p in configs.values()}) == len(EXPECTED)
    assert all(p["availability_topic"] == app.topic("status") for p in configs.values())

    # the templates give the readings the appliance published (rendered on the real retained messages)
    status = retained(ha, app.topic("status"), lambda s: s["state"] == "ready")
    telemetry = retained(ha, app.topic("telemetry"), lambda t: t["temperature_c"] is not None)
    by_key = {t.split("/")[3]: p for t, p in configs.items()}

    def value(key: str) -> str:
        payload = by_key[key]
        return render(payload["value_template"], status if payload["state_topic"].endswith("/status") else telemetry)

    assert value("state") == "ready" and value("state") in by_key["state"]["options"] == list(STATES)
    assert value("model") == "tiny" and value("version") == __version__
    assert float(value("temperature")) == 45.0
    assert 3500 < float(value("memory_available")) <= 4096
    assert value("throttle") == "under_voltage, throttled, under_voltage_occurred, throttled_occurred"
    assert value("under_voltage") == by_key["under_voltage"].get("payload_on", "ON")
    assert float(value("tokens_per_second")) >= 0 and int(value("queue_depth")) == 0
    assert render(by_key["state"]["availability_template"], status) == "online"

    # availability is tied to the Last Will: the broker says `offline` for a device that died
    app.kill()
    dead = retained(ha, app.topic("status"), lambda s: s["state"] == "offline", timeout=30)
    assert render(by_key["state"]["availability_template"], dead) == "offline"


def test_missing_readings_are_unknown_not_zero(appliance_factory, mqtt_client, tmp_path):
    """No vcgencmd, no thermal zone: Home Assistant is told 'None' (unknown), not OFF or 0."""
    board = FakeBoard(tmp_path / "board")
    overrides = merge(board.overrides(), {"homeassistant": {"discovery": True},
                                          "thermal": {"vcgencmd": "", "sensor_file": str(tmp_path / "none")}})
    app = appliance_factory(overrides=overrides)
    ha = mqtt_client()
    by_key = {t.split("/")[3]: p for t, p in discovery_configs(ha, app.device).items()}
    telemetry = retained(ha, app.topic("telemetry"))
    for key in ("temperature", "throttle", "under_voltage"):
        assert render(by_key[key]["value_template"], telemetry) == "None", key


def test_home_assistant_coming_online_gets_a_new_announcement(appliance_factory, mqtt_client, tmp_path):
    board = FakeBoard(tmp_path / "board")
    app = appliance_factory(overrides=merge(board.overrides(), {"homeassistant": {"discovery": True}}),
                            env=board.env())
    ha = mqtt_client()
    configs = discovery_configs(ha, app.device)
    # Home Assistant's broker lost its retained messages (a broker without persistence restarted)
    for topic in configs:
        ha.publish(topic, b"", retain=True)
    ha.publish("homeassistant/status", b"offline")
    ha.subscribe(app.topic("status"))
    time.sleep(1)
    ha.messages.clear()
    ha.publish("homeassistant/status", b"online")
    birth = time.monotonic()
    again = discovery_configs(ha, app.device, timeout=30)
    assert time.monotonic() - birth < 30
    assert again == configs
    # state follows the announcement, so Home Assistant has values at once (telemetry comes every second here, so
    # look at the status, which is otherwise published only when the state changes)
    ha.wait_for(lambda m: m.topic == app.topic("status") and not m.retain, timeout=10)


def test_off_unless_configured_and_withdrawn_when_turned_off(appliance_factory, mqtt_client, tmp_path):
    board = FakeBoard(tmp_path / "board")
    app = appliance_factory(overrides=board.overrides(), env=board.env())
    ha = mqtt_client()
    ha.subscribe(f"homeassistant/+/{node(app.device)}/+/config")
    retained(ha, app.topic("telemetry"))  # connected and publishing
    time.sleep(2)
    assert not [m for m in ha.messages if m.topic.startswith("homeassistant/")], "nothing announced by default"
    app.stop()

    app.config["homeassistant"] = {"discovery": True}
    app.start()
    assert len(discovery_configs(ha, app.device)) == len(EXPECTED)
    app.stop()

    app.config["homeassistant"] = {"discovery": False}
    app.start()
    retained(ha, app.topic("status"), lambda s: s["state"] == "ready")
    late = mqtt_client()  # Home Assistant starting now finds no retained config of this device
    late.subscribe(f"homeassistant/+/{node(app.device)}/+/config")
    time.sleep(2)
    assert [m.topic for m in late.messages if m.payload] == []


def test_first_boot_turns_it_on_and_the_shipped_acl_lets_home_assistant_in(appliance_factory, tmp_path):
    boot, root, state = scratch_device(tmp_path)
    secret = "home assistant's own password"
    (boot / "appliance.toml").write_text(f'[homeassistant]\ndiscovery = true\n\n[mqtt_users]\n'
                                         f'homeassistant = "{secret}"\nsensor-1 = "{secret} too"\n')
    assert firstboot(boot, root, state).returncode == 0
    written = (root / "etc/appliance/appliance.toml").read_text()
    assert "[homeassistant]\ndiscovery = true" in written
    broker = device_broker(tmp_path, root)
    try:
        app = appliance_factory(start=False, overrides={
            "mqtt": {"port": broker.port, "username": "appliance",
                     "password_file": str(root / "etc/appliance/mqtt-password")},
            "homeassistant": {"discovery": True}, "supervisor": {"telemetry_interval": 2}})
        app.start()
        ha = MqttClient(broker.host, broker.port, username="homeassistant", password=secret)
        configs = discovery_configs(ha, app.device)
        assert len(configs) == len(EXPECTED)
        retained(ha, app.topic("telemetry"))  # Home Assistant may read the state topics
        # a sensor's account cannot plant a discovery config
        sensor = MqttClient(broker.host, broker.port, username="sensor-1", password=f"{secret} too")
        sensor.publish(f"homeassistant/sensor/{node(app.device)}/spoof/config", {"state_topic": "x"})
        ha.messages.clear()
        ha.publish("homeassistant/status", b"online")  # Home Assistant's birth is allowed and heard
        assert len(discovery_configs(ha, app.device)) == len(EXPECTED)
        assert not [m for m in ha.messages if m.topic.endswith("/spoof/config")]
        sensor.close()
        ha.close()
        app.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize("overrides, needle", [
    ({"homeassistant": {"discovery": True}, "supervisor": {"telemetry_interval": 0}}, "supervisor.telemetry_interval"),
    ({"homeassistant": {"discovery": True}, "mqtt": {"enabled": False}}, "mqtt.enabled"),
])
def test_discovery_needs_mqtt_and_telemetry(overrides, needle, tmp_path):
    from appliance.config import ConfigError, load_config
    from tests.support.harness import toml_text
    path = Path(tmp_path / "c.toml")
    path.write_text(toml_text(overrides))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(path, env={})
