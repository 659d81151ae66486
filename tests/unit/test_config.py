"""Config loading: defaults, TOML, APPLIANCE_* overrides, and errors that name the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config, reference_markdown


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    config = load_config(None, env={})
    assert config.mqtt.port == 1883 and config.mqtt.protocol == "5" and config.mqtt.topic_prefix == "appliance"
    assert config.http.bind == "127.0.0.1" and config.logging.log_prompts is False
    assert config.worker.max_queue == 8 and config.models.default == "smollm2-135m-instruct"
    assert config.mqtt_client_id == f"appliance-{config.device.id}"


def test_file_and_env_overrides(tmp_path):
    path = write(tmp_path, '[device]\nid = "pi-01"\n[mqtt]\nport = 1999\n[worker]\nrequest_timeout = 30\n')
    config = load_config(path, env={"APPLIANCE_MQTT_PORT": "1884", "APPLIANCE_HTTP_PORT": "8081",
                                    "APPLIANCE_DEVICE_ID": "pi-07", "APPLIANCE_LOGGING_LOG_PROMPTS": "yes",
                                    "APPLIANCE_MQTT_PASSWORD_FILE": "", "UNRELATED": "x"})
    assert config.mqtt.port == 1884 and config.http.port == 8081 and config.device.id == "pi-07"
    assert config.logging.log_prompts is True and config.worker.request_timeout == 30.0
    assert config.mqtt.password_file is None


def test_every_problem_is_reported_with_key_and_value(tmp_path):
    path = write(tmp_path, '[mqtt]\nport = 0\nprotocol = "4"\ntopic_prefix = "a/#"\n'
                           '[http]\nthreads = true\n[logging]\nlevel = "loud"\n[device]\nid = "my device"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"APPLIANCE_WORKER_MAX_QUEUE": "-1"})
    problems = "\n".join(err.value.problems)
    for expected in ("mqtt.port = 0: must be between 1 and 65535",
                     "mqtt.protocol = '4': must be one of 5, 3.1.1",
                     "mqtt.topic_prefix = 'a/#'",
                     "http.threads = True: must be an integer, not bool",
                     "logging.level = 'loud': must be one of debug, info, warning, error",
                     "device.id = 'my device'",
                     "APPLIANCE_WORKER_MAX_QUEUE = -1: must be between 0 and 10000"):
        assert expected in problems
    assert len(err.value.problems) == 7


def test_unknown_keys_and_sections_are_errors_with_suggestions(tmp_path):
    path = write(tmp_path, '[mqtt]\nhots = "x"\n[wokrer]\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"APPLIANCE_HTTP_BINDD": "0.0.0.0"})
    problems = err.value.problems
    assert "mqtt.hots: unknown key (did you mean 'host'?)" in problems
    assert "[wokrer]: unknown section (did you mean 'worker'?)" in problems
    assert any(p.startswith("APPLIANCE_HTTP_BINDD: no such key http.bindd (did you mean 'bind'?)") for p in problems)


def test_cross_checks(tmp_path):
    path = write(tmp_path, '[mqtt]\npassword_file = "/nonexistent"\ntls = false\nca_file = "/nonexistent"\n'
                           '[worker]\ncontext_size = 128\ndefault_max_tokens = 256\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = "\n".join(err.value.problems)
    assert "mqtt.password_file is set but mqtt.username is empty" in text
    assert "mqtt.password_file = '/nonexistent': file not found" in text
    assert "mqtt.ca_file/cert_file are set but mqtt.tls is false" in text
    assert "worker.default_max_tokens = 256: must not exceed worker.context_size (128)" in text


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[mqtt\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in err.value.problems[0] and "not valid TOML" in err.value.problems[0]


def test_reference_documents_every_key():
    text = reference_markdown()
    for key in ("`session_expiry`", "`log_prompts`", "`max_queue`", "`api_key_file`", "`fleet_session_expiry`"):
        assert key in text
    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert docs.read_text() == text + "\n", "docs/config.md is stale: run `appliance config reference > docs/config.md`"
