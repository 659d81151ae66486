"""`make run` with no broker configured (mqtt.host empty): the appliance starts a private mosquitto on loopback."""

from __future__ import annotations

import json
import re
import socket

from appliance.transports.broker import free_port, port_is_free
from tests.support.harness import MqttClient, http_post


def _round_trip(app, port: int) -> dict:
    """One request through the broker on ``port``, once the appliance is subscribed there."""
    client = MqttClient("127.0.0.1", port)
    try:
        # the appliance subscribes before it publishes its retained status, and its session is new on this
        # broker: a request sent before the subscription would be dropped, not queued
        client.subscribe(app.topic("status"))
        client.wait_for(lambda m: m.topic == app.topic("status") and json.loads(m.payload)["state"] == "ready")
        return client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 3})[-1]
    finally:
        client.close()


def test_private_broker_on_the_configured_port(appliance_factory):
    port = free_port()
    app = appliance_factory(overrides={"mqtt": {"host": "", "port": port}})
    final = _round_trip(app, port)  # first: it waits for the "ready" status, so the MQTT connect has been logged
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 3
    log = app.log_text()
    assert f"private mosquitto listening on 127.0.0.1:{port}" in log
    assert f"MQTT 127.0.0.1:{port} topics appliance/{app.device}/generate" in log
    assert app.stop() == 0
    assert port_is_free("127.0.0.1", port), "the private broker stops with the appliance"


def test_private_broker_moves_to_a_free_port_when_the_port_is_taken(appliance_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = appliance_factory(overrides={"mqtt": {"host": "", "port": port}})
        moved = re.search(rf"MQTT: port {port} is taken; the private broker uses (\d+)", app.log_text())
        assert moved, app.log_text()[-2000:]
        other = int(moved.group(1))
        assert other != port
        assert f"private mosquitto listening on 127.0.0.1:{other}" in app.log_text()
        assert f"MQTT 127.0.0.1:{other} topics" in app.log_text()
        final = _round_trip(app, other)
    assert final["type"] == "result"


def test_no_private_broker_serves_http_only_and_says_why(appliance_factory):
    port = free_port()
    app = appliance_factory(overrides={"mqtt": {"host": "", "port": port, "private_broker": False}})
    status, body = http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    log = app.log_text()
    assert "no broker configured (mqtt.host is empty) and mqtt.private_broker is false; serving HTTP only" in log
    assert "; no MQTT; HTTP http://" in log
    assert "private mosquitto" not in log and port_is_free("127.0.0.1", port)
