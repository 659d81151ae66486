"""The mosquitto configuration the appliance ships (systemd/mosquitto): no anonymous access, per-user reply trees,
and everything the appliance needs (its topics, the shared fleet subscription, replies to any requester)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import pytest

from appliance.transports.broker import Mosquitto, free_port
from tests.support.harness import REPO, MqttClient

SHIPPED = REPO / "systemd" / "mosquitto"
USERS = {"appliance": "pw-appliance", "sensor1": "pw-sensor1", "sensor2": "pw-sensor2"}


@pytest.fixture
def secured_broker(tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd is required (apt install mosquitto)")
    os.chmod(tmp_path, 0o777)
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True)
    acl = tmp_path / "acl"
    shutil.copy(SHIPPED / "appliance.acl", acl)
    shipped = (SHIPPED / "appliance.conf").read_text()
    # the shipped settings, minus what the test broker sets itself (listeners, paths, persistence, logging)
    kept = [line for line in shipped.splitlines()
            if line and not line.startswith("#")
            and not re.match(r"(listener|password_file|acl_file|persistence\w*|autosave\w*|log_dest)\b", line)]
    extra = "\n".join([*kept, f"password_file {passwd}", f"acl_file {acl}"])
    assert "allow_anonymous false" in extra
    broker = Mosquitto(tmp_path / "data", free_port(), persistence=False, extra=extra)
    broker.start()
    yield broker
    broker.stop()


def _client(broker, user: str | None) -> MqttClient:
    return MqttClient(broker.host, broker.port, username=user, password=USERS.get(user))


def test_shipped_acl(secured_broker, appliance_factory, tmp_path):
    with pytest.raises(Exception, match="refused|not authorised|Not authorized|could not connect"):
        _client(secured_broker, None)  # anonymous

    password_file = tmp_path / "mqtt-password"
    password_file.write_text(USERS["appliance"] + "\n")
    app = appliance_factory(overrides={"mqtt": {"port": secured_broker.port, "username": "appliance",
                                                      "password_file": str(password_file)}}, mqtt=True, start=False)
    app.start()

    sensor1, sensor2 = _client(secured_broker, "sensor1"), _client(secured_broker, "sensor2")
    sensor1.subscribe("replies/sensor2/#")  # granted by the broker, but never delivered: read ACL per message
    reply = sensor2.request(app.topic("generate"), {"prompt": "a", "max_tokens": 3},
                            reply_topic=f"replies/sensor2/{uuid.uuid4().hex}")[-1]
    assert reply["type"] == "result"
    reply = sensor1.request("appliance/fleet/generate", {"prompt": "a", "max_tokens": 3},
                            reply_topic=f"replies/sensor1/{uuid.uuid4().hex}")[-1]
    assert reply["type"] == "result", "the fleet subscription works under the ACL"
    assert not [m for m in sensor1.messages if m.topic.startswith("replies/sensor2/")]
    sensor1.subscribe(app.topic("status"))
    sensor1.wait_for(lambda m: m.topic == app.topic("status"))
