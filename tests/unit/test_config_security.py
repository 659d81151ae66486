"""The config's security rules: no HTTP API on the network without a key unless the operator opts in, names and
secrets checked with anchored patterns (a trailing newline is not a name), and secrets named, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config

KEY = "k3y-for-the-http-api-0123"


def problems_of(tmp_path: Path, text: str, env: dict | None = None) -> list[str]:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    try:
        load_config(path, env=env or {})
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.2", "", "appliance.local"])
def test_a_network_bind_needs_a_key_or_the_opt_in(tmp_path, bind):
    found = problems_of(tmp_path, f'[http]\nbind = "{bind}"\n')
    assert len(found) == 1, found
    for key in ("http.bind", "http.api_key_file", "http.allow_anonymous"):
        assert key in found[0]
    assert problems_of(tmp_path, f'[http]\nbind = "{bind}"\nallow_anonymous = true\n') == []
    assert problems_of(tmp_path, f'[http]\nbind = "{bind}"\nenabled = false\n') == []
    (tmp_path / "key").write_text(KEY + "\n")
    assert problems_of(tmp_path, f'[http]\nbind = "{bind}"\napi_key_file = "{tmp_path / "key"}"\n') == []


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_key(tmp_path, bind):
    assert problems_of(tmp_path, f'[http]\nbind = "{bind}"\n') == []


@pytest.mark.parametrize("content, reason", [
    ("", "file is empty"),
    ("short-key\n", "16-256 printable ASCII"),
    ("a key with spaces in it\n", "16-256 printable ASCII"),
    ("clé-avec-accents-0123456\n", "16-256 printable ASCII"),
    (KEY + "\nsecond line\n", "on one line"),
    (KEY + "\x00" + "\n", "control character (U+0000)"),
])
def test_the_api_key_file_is_checked_and_its_key_never_shown(tmp_path, content, reason):
    (tmp_path / "key").write_text(content)
    found = problems_of(tmp_path, f'[http]\nbind = "0.0.0.0"\napi_key_file = "{tmp_path / "key"}"\n')
    assert len(found) == 1 and found[0].startswith(f"http.api_key_file = '{tmp_path / 'key'}'"), found
    assert reason in found[0]
    assert not any(part in found[0] for part in ("short-key", "spaces in", "second line", "avec", KEY)), found


def test_a_trailing_newline_is_not_a_name(tmp_path):
    found = problems_of(tmp_path, '[device]\nid = "pi-07\\n"\n[mqtt]\nfleet_group = "group\\n"\n')
    assert any(p.startswith("device.id") for p in found) and any(p.startswith("mqtt.fleet_group") for p in found)
    found = problems_of(tmp_path, "", env={"APPLIANCE_DEVICE_ID": "pi-07\n"})
    assert len(found) == 1 and found[0].startswith("APPLIANCE_DEVICE_ID")


def test_no_string_takes_a_control_character(tmp_path):
    found = problems_of(tmp_path, '[gpio]\nshutdown_command = "systemctl poweroff\\nrm -rf /"\n'
                                  '[models]\ndefault = "tiny\\t"\n[mqtt]\nclient_id = "me\\u0000"\n')
    assert sorted(p.split(":")[0] for p in found) == ["gpio.shutdown_command", "models.default", "mqtt.client_id"]
    assert all("control character" in p for p in found)


def test_broker_credentials_are_checked(tmp_path):
    password = tmp_path / "mqtt-password"
    password.write_text("a good password\n")
    good = f'[mqtt]\nusername = "appliance"\npassword_file = "{password}"\n'
    assert problems_of(tmp_path, good) == []
    assert "'+', '#' or '/'" in problems_of(tmp_path, good.replace('"appliance"', '"sensor/+"'))[0]
    password.write_text("first line\nsecond line\n")
    assert "one line" in problems_of(tmp_path, good)[0]


def test_a_secret_put_where_a_file_belongs_is_not_shown(tmp_path):
    """Operators mix up `password_file` and the password: the value is shown only when it looks like a path."""
    found = problems_of(tmp_path, '[mqtt]\nusername = "appliance"\npassword_file = "hunter2-but-longer"\n'
                                  '[http]\napi_key_file = "my-secret-api-key-0123"\n')
    assert len(found) == 2 and not any("hunter2" in p or "my-secret" in p for p in found), found
    assert all("value not shown" in p for p in found)
    found = problems_of(tmp_path, '[mqtt]\nusername = "appliance"\npassword_file = "/etc/nowhere/pw"\n')
    assert found == ["mqtt.password_file = '/etc/nowhere/pw': file not found"]
