"""Names and secrets on the ways into a device: the boot partition's settings file (first boot) and `appliance
mqtt-users` (what the Ansible role runs). Every name and password is checked (a trailing newline is not a name, a
line break in a password cannot add an account to the broker's password file), passwords reach the broker exactly
as typed, and no secret is shown anywhere: console, firstboot.json, the retained MQTT status. An API key on the
card opens the HTTP API to the network; an empty one closes it again."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tomllib

import pytest

from appliance.firstboot.settings import check_config
from tests.support.harness import MqttClient, run_cli
from tests.support.scratch_device import IMAGE_CONFIG, SERVICE_GID, device_broker, firstboot, scratch_device

REFUSED = "refused|not authorised|Not authorized|could not connect"
API_KEY = "an-api-key-from-the-card-0123"
#: a password file line for the service's account, made by `mosquitto_passwd -U` for "the attacker's password"
INJECTED = ("appliance:$7$101$LAhiIMdYSR8dxgEi$5XRZU2t49tCCWfSAxDOaGD9Uv5yB8P1ZrEzy61Lvf+vzm9ieCoibaJFGfl/MX1N/"
            "HVMRACbEHVO18hG/j2xuHw==")


@pytest.fixture
def device(tmp_path):
    return scratch_device(tmp_path)


def _accounts(root) -> dict[str, str]:
    path = root / "etc/mosquitto/appliance.passwd"
    return dict(line.split(":", 1) for line in path.read_text().splitlines())


def _connects(broker, user: str, password: str) -> bool:
    try:
        MqttClient(broker.host, broker.port, username=user, password=password).close()
    except ConnectionRefusedError:
        return False
    return True


def test_a_line_break_cannot_add_or_replace_a_broker_account(device, tmp_path):
    boot, root, state = device
    assert firstboot(boot, root, state).returncode == 0  # the device's own account, as at its first power-on
    before = _accounts(root)
    injected = INJECTED
    for users, named in (('"sensor\\n" = "a long password"', "mqtt_users.'sensor\\n'"),
                         (f'sensor = "a long password\\n{injected}"', "mqtt_users.sensor"),
                         ('"sensor\\u2028x" = "a long password"', "mqtt_users.'sensor\\u2028x'"),
                         ('appliance = "hijack the service"', "mqtt_users.appliance: reserved")):
        (boot / "appliance.toml").write_text(f"[mqtt_users]\n{users}\n")
        result = firstboot(boot, root, state)
        assert result.returncode == 1 and named in result.stdout, (users, result.stdout)
        assert "attacker" not in result.stdout and "$7$" not in result.stdout and "hijack" not in result.stdout
        assert _accounts(root) == before, users
    broker = device_broker(tmp_path, root)
    try:
        assert _connects(broker, "appliance", (root / "etc/appliance/mqtt-password").read_text().strip())
        assert not _connects(broker, "appliance", "the attacker's password")
    finally:
        broker.stop()


def test_passwords_reach_the_broker_exactly_as_typed(device, tmp_path):
    """mosquitto_passwd -U read a password up to the next ':' and trimmed its spaces; the sensor sends all of it."""
    boot, root, state = device
    typed = {"colon": "before:after-the-colon", "spaces": "  spaced out  ", "accents": "contraseña-güey-密码"}
    (boot / "appliance.toml").write_text("[mqtt_users]\n" + "".join(f"{n} = {json.dumps(p)}\n"
                                                                     for n, p in typed.items()))
    assert firstboot(boot, root, state).returncode == 0
    broker = device_broker(tmp_path, root)
    try:
        for name, password in typed.items():
            assert _connects(broker, name, password), name
        assert not _connects(broker, "colon", "before"), "not cut at the colon"
        assert not _connects(broker, "spaces", "spaced out"), "not trimmed"
    finally:
        broker.stop()


def test_no_secret_is_shown_anywhere(device, tmp_path, appliance_factory, mqtt_client):
    boot, root, _ = device
    secrets = ["top-level-api-key-0123456789", "put-where-a-path-goes-123", "shorty1",
               "tiny-key", "1234567"]
    (boot / "appliance.toml").write_text(
        f'api_key = "{secrets[0]}"\n\n[mqtt]\npassword_file = "{secrets[1]}"\n\n'
        f'[mqtt_users]\nsensor = "{secrets[2]}"\n\n[http]\napi_key = "{secrets[3]}"\n\n'
        f'[wifi]\nssid = "net"\npsk = "{secrets[4]}"\n')
    private = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    (boot / "authorized_keys").write_text(private.read_text())  # the wrong half of the pair
    secrets += [line[i:i + 16] for line in private.read_text().splitlines()[1:-1] for i in range(0, 48, 16)]

    app = appliance_factory(start=False)
    state = tmp_path / "state-of-the-appliance"
    app.config["device"]["state_dir"] = str(state)
    result = firstboot(boot, root, state)
    assert result.returncode == 1
    report = (state / "firstboot.json").read_text()
    for named in ("api_key: expected a [api_key] table", "mqtt.password_file (value not shown",
                  "mqtt_users.sensor: the password must be", "http.api_key: an API key is", "wifi.psk must be",
                  "authorized_keys: holds a private key"):
        assert named in result.stdout and named in report, named

    app.start()
    status_topic = app.topic("status")
    client = mqtt_client()
    client.subscribe(status_topic)
    retained = json.loads(client.wait_for(lambda m: m.topic == status_topic
                                          and json.loads(m.payload).get("warnings"))[-1].payload)
    assert any("api_key" in w for w in retained["warnings"]), retained
    for where, text in (("console", result.stdout + result.stderr), ("firstboot.json", report),
                        ("MQTT status", json.dumps(retained)), ("log", app.log_text())):
        for secret in secrets:
            assert secret not in text, (where, secret)


def test_mqtt_users_refuses_what_first_boot_refuses(device):
    """The Ansible role's path: JSON on stdin; exit 2 naming the account, never its password; nothing changed."""
    _, root, _ = device
    assert run_cli("mqtt-users", "--root", str(root), env={}, input="{}").returncode == 0
    before = _accounts(root)
    injected = INJECTED
    for users, named in (({"sensor\n": "a long password"}, "stdin.'sensor\\n'"),
                         ({"sensor": f"a long password\n{injected}"}, "stdin.sensor: the password contains"),
                         ({"sensor": "short"}, "stdin.sensor: the password must be"),
                         ({"sen/sor": "a long password"}, "stdin.'sen/sor'"),
                         ({"appliance": "hijack the service"}, "stdin.appliance: reserved"),
                         ({"sensor": 12345678}, "stdin.sensor: the password must be a string")):
        result = run_cli("mqtt-users", "--root", str(root), input=json.dumps(users))
        assert result.returncode == 2 and named in result.stderr, (users, result.stderr)
        assert "attacker" not in result.stderr + result.stdout and "short" not in result.stderr
        assert _accounts(root) == before


def test_the_image_serves_this_device_only_until_a_key_is_set(device):
    boot, root, state = device
    assert firstboot(boot, root, state).returncode == 0  # the device's own broker password, which the config names
    shipped = tomllib.loads(IMAGE_CONFIG.read_text())
    assert ipaddress.ip_address(shipped["http"]["bind"]).is_loopback and check_config(shipped, root) == []

    (boot / "appliance.toml").write_text(f'[http]\napi_key = "{API_KEY}"\n')
    assert firstboot(boot, root, state).returncode == 0
    config = tomllib.loads((root / "etc/appliance/appliance.toml").read_text())
    assert config["http"] == {"bind": "0.0.0.0", "port": 8080, "api_key_file": "/etc/appliance/api-key"}
    key = (root / "etc/appliance/api-key").stat()
    assert (key.st_mode & 0o777, key.st_uid, key.st_gid) == (0o640, 0, SERVICE_GID)
    assert check_config(config, root) == []
    assert API_KEY not in (boot / "appliance.toml.applied").read_text()

    (boot / "appliance.toml").write_text('[http]\napi_key = ""\n')  # "" takes the key away again
    assert firstboot(boot, root, state).returncode == 0
    config = tomllib.loads((root / "etc/appliance/appliance.toml").read_text())
    assert config["http"] == {"bind": "127.0.0.1", "port": 8080} and check_config(config, root) == []
    assert not (root / "etc/appliance/api-key").exists()

    (boot / "appliance.toml").write_text(f'[http]\napi_key = "{API_KEY}"\nbind = "192.0.2.7"\n')
    assert firstboot(boot, root, state).returncode == 0, "an address the file sets wins"
    assert tomllib.loads((root / "etc/appliance/appliance.toml").read_text())["http"]["bind"] == "192.0.2.7"


def test_a_config_that_served_the_network_without_a_key_is_closed_at_boot(device):
    """Images before API keys served 0.0.0.0 with none: the new release would refuse that config, so first boot
    binds it to loopback (and says so), and a settings file adding a sensor still applies."""
    boot, root, state = device
    config = root / "etc/appliance/appliance.toml"
    config.write_text(config.read_text().replace('bind = "127.0.0.1"', 'bind = "0.0.0.0"'))
    (boot / "appliance.toml").write_text('[mqtt_users]\nsensor = "a long password"\n')
    result = firstboot(boot, root, state)
    assert result.returncode == 0, result.stdout
    assert tomllib.loads(config.read_text())["http"]["bind"] == "127.0.0.1"
    report = json.loads((state / "firstboot.json").read_text())
    assert any("http.bind was '0.0.0.0' with no API key" in line for line in report["device"]), report
    assert "sensor" in _accounts(root) and check_config(tomllib.loads(config.read_text()), root) == []
