"""`appliance firstboot` on a scratch tree: the settings an operator leaves on the boot partition are checked as a
whole, applied (broker accounts that a real mosquitto accepts, config the appliance loads, Wi-Fi, host name, SSH
keys), and retired with their secrets blanked; a bad file changes nothing and says what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

from appliance.firstboot import problems
from appliance.firstboot.settings import check_config
from tests.support.harness import REPO, MqttClient
from tests.support.scratch_device import SERVICE_GID, device_broker, firstboot, scratch_device

SECRET = "correct horse battery staple"
API_KEY = "k" * 24
PSK = "wifi-passphrase-123"


def _keypair(tmp_path) -> str:
    key = tmp_path / "operator_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return (tmp_path / "operator_key.pub").read_text().strip()


@pytest.fixture
def device(tmp_path):
    return scratch_device(tmp_path)


def test_settings_are_applied_once_and_their_secrets_wiped(device, tmp_path):
    boot, root, state = device
    public_key = _keypair(tmp_path)
    (boot / "appliance.toml").write_text(
        f'[device]\nid = "pi-07"\n\n[worker]\ncontext_size = 1024\n\n[http]\napi_key = "{API_KEY}"\n\n'
        f'[mqtt_users]\nsensor-1 = "{SECRET}"\n\n[wifi]\nssid = "community-net"\npsk = "{PSK}"\ncountry = "KE"\n')
    (boot / "hostname").write_text("pi-07\r\n")  # written on Windows
    (boot / "authorized_keys").write_text(f"# the operator\n{public_key}\n")

    result = firstboot(boot, root, state)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr

    written = tomllib.loads((root / "etc/appliance/appliance.toml").read_text())
    assert check_config(written, root) == [], "the appliance starts with what was written"
    assert (written["device"]["id"], written["worker"]["context_size"], written["http"]["bind"]) == \
        ("pi-07", 1024, "0.0.0.0")
    assert written["http"]["api_key_file"] == "/etc/appliance/api-key"
    key_file = (root / "etc/appliance/api-key").stat()
    assert (root / "etc/appliance/api-key").read_text().strip() == API_KEY
    assert (key_file.st_mode & 0o777, key_file.st_uid, key_file.st_gid) == (0o640, 0, SERVICE_GID)
    assert (root / "etc/hostname").read_text() == "pi-07\n"
    assert "127.0.1.1\tpi-07" in (root / "etc/hosts").read_text()
    assert (root / "home/admin/.ssh/authorized_keys").read_text().strip() == public_key
    wifi = root / "etc/NetworkManager/system-connections/appliance-wifi.nmconnection"
    assert "ssid=community-net" in wifi.read_text() and f"psk={PSK}" in wifi.read_text()
    assert wifi.stat().st_mode & 0o077 == 0, "the Wi-Fi keyfile is root's alone"
    assert "ieee80211_regdom=KE" in (root / "etc/modprobe.d/appliance-wifi-country.conf").read_text()
    assert {p.name for p in (root / "etc/ssh").iterdir()} >= {"ssh_host_ed25519_key", "ssh_host_ecdsa_key"}

    passwd = (root / "etc/mosquitto/appliance.passwd").read_text()
    assert SECRET not in passwd and {line.split(":")[0] for line in passwd.splitlines()} == {"appliance", "sensor-1"}
    broker = device_broker(tmp_path, root)
    try:
        MqttClient(broker.host, broker.port, username="sensor-1", password=SECRET).close()
        service_password = (root / "etc/appliance/mqtt-password").read_text().strip()
        MqttClient(broker.host, broker.port, username="appliance", password=service_password).close()
        with pytest.raises(Exception, match="refused|not authorised|Not authorized|could not connect"):
            MqttClient(broker.host, broker.port, username="sensor-1", password="wrong password")
    finally:
        broker.stop()

    assert sorted(p.name for p in boot.iterdir()) == ["appliance.toml.applied", "authorized_keys.applied",
                                                     "hostname.applied"]
    retired = (boot / "appliance.toml.applied").read_text()
    assert SECRET not in retired and PSK not in retired and API_KEY not in retired
    assert tomllib.loads(retired)["device"]["id"] == "pi-07", "what was applied stays readable"
    report = json.loads((state / "firstboot.json").read_text())
    assert report["problems"] == [] and len(report["applied"]) == 5

    before = {p: p.read_bytes() for p in (root / "etc").rglob("*") if p.is_file()}
    again = firstboot(boot, root, state)
    assert again.returncode == 0
    assert {p: p.read_bytes() for p in (root / "etc").rglob("*") if p.is_file()} == before, "applied once"


def test_a_bad_file_changes_nothing_and_names_every_problem(device):
    boot, root, state = device
    config_before = (root / "etc/appliance/appliance.toml").read_text()
    (boot / "appliance.toml").write_text('[mqtt]\nport = "eighteen"\n\n[worker]\nthreadz = 2\n\n'
                                         '[mqtt_users]\nappliance = "hijack-the-service"\nsensor = "short"\n'
                                         '[wifi]\nssid = "x"\npsk = "1234"\n')
    (boot / "hostname").write_text("-bad_name-\n")
    (boot / "authorized_keys").write_text("ssh-ed25519 not-a-key\n")

    result = firstboot(boot, root, state)
    assert result.returncode == 1
    for needle in ("mqtt.port", "eighteen", "worker.threadz", "mqtt_users.appliance", "mqtt_users.sensor",
                   "wifi.psk", "'-bad_name-'", "authorized_keys: key 1"):
        assert needle in result.stdout, needle
    assert (root / "etc/appliance/appliance.toml").read_text() == config_before
    assert not (root / "etc/hostname").exists() and not (root / "home").exists()
    assert (boot / "appliance.toml").is_file(), "left in place for the operator to fix"
    warnings = problems(state)
    assert any("mqtt.port" in w for w in warnings) and all(w.startswith("boot partition settings") for w in warnings)

    # fixed: applied, and the warnings are gone
    (boot / "appliance.toml").write_text('[mqtt_users]\nsensor = "long enough now"\n')
    (boot / "hostname").unlink()
    (boot / "authorized_keys").unlink()
    assert firstboot(boot, root, state).returncode == 0
    assert problems(state) == []


def test_each_file_stands_on_its_own(device, tmp_path):
    boot, root, state = device
    (boot / "appliance.toml").write_text('[worker]\ncontext_size = "big"\n')
    (boot / "authorized_keys").write_text(_keypair(tmp_path) + "\n")
    result = firstboot(boot, root, state)
    assert result.returncode == 1 and "worker.context_size" in result.stdout
    assert (root / "home/admin/.ssh/authorized_keys").is_file(), "the keys let the operator in to look"
    assert sorted(p.name for p in boot.iterdir()) == ["appliance.toml", "authorized_keys.applied"]


def test_accounts_are_changed_and_removed_by_name(device, tmp_path):
    boot, root, state = device
    (boot / "appliance.toml").write_text('[mqtt_users]\nsensor-1 = "first password"\nsensor-2 = "second password"\n')
    assert firstboot(boot, root, state).returncode == 0
    (boot / "appliance.toml").write_text('[mqtt_users]\nsensor-1 = ""\nsensor-2 = "a new password"\n')
    assert firstboot(boot, root, state).returncode == 0
    names = {line.split(":")[0] for line in (root / "etc/mosquitto/appliance.passwd").read_text().splitlines()}
    assert names == {"appliance", "sensor-2"}
    broker = device_broker(tmp_path, root)
    try:
        MqttClient(broker.host, broker.port, username="sensor-2", password="a new password").close()
        for user, password in (("sensor-2", "second password"), ("sensor-1", "first password")):
            with pytest.raises(Exception, match="refused|not authorised|Not authorized|could not connect"):
                MqttClient(broker.host, broker.port, username=user, password=password,
                           client_id=f"t-{uuid.uuid4().hex[:8]}")
    finally:
        broker.stop()


def test_the_appliance_shows_what_first_boot_could_not_apply(appliance_factory, tmp_path):
    app = appliance_factory(start=False)
    boot, root = tmp_path / "boot", tmp_path / "root"
    boot.mkdir()
    (boot / "appliance.toml").write_text('[http]\nport = "eighty"\n')
    state = Path(app.config["device"]["state_dir"])
    assert firstboot(boot, root, state).returncode == 1
    app.start()
    status = app.wait_status(lambda s: s["state"] == "ready")
    assert any("http.port" in w and "eighty" in w for w in status["warnings"]), status["warnings"]


def test_broker_accounts_from_stdin_are_idempotent(device, tmp_path):
    _, root, _ = device

    def users(body: dict, *args: str):
        result = subprocess.run([sys.executable, "-m", "appliance", "mqtt-users", "--root", str(root), *args],
                                input=json.dumps(body), capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert users({"sensor-1": SECRET, "sensor-2": SECRET}) == {"changed": True,
                                                               "accounts": ["appliance", "sensor-1", "sensor-2"]}
    before = (root / "etc/mosquitto/appliance.passwd").read_text()
    assert users({"sensor-1": SECRET, "sensor-2": SECRET})["changed"] is False, "same passwords: same hashes"
    assert (root / "etc/mosquitto/appliance.passwd").read_text() == before
    assert users({"sensor-2": "a different password"})["changed"] is True
    assert users({"sensor-2": "a different password"}, "--exact") == {"changed": True,
                                                                      "accounts": ["appliance", "sensor-2"]}
    broker = device_broker(tmp_path, root)
    try:
        MqttClient(broker.host, broker.port, username="sensor-2", password="a different password").close()
    finally:
        broker.stop()


def test_first_boot_never_follows_a_link_planted_in_the_state_directory(device, tmp_path):
    """The service's account owns /var/lib/appliance and could leave links there for root's first boot to write
    through: to a file that does not exist yet (a new sudoers or cron file) or to a trusted key file."""
    boot, root, state = device
    victims = tmp_path / "victims"
    victims.mkdir()
    signers = victims / "bundle-signers"
    signers.write_text("appliance-bundle the operator's key\n")
    (state / ".device-initialized").symlink_to(victims / "sudoers-evil")
    (state / "firstboot.json").symlink_to(signers)
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)  # as on a device: the state directory is the service's
    (boot / "hostname").write_text("planted-links\n")

    result = firstboot(boot, root, state)
    assert result.returncode == 0, result.stderr
    assert not (victims / "sudoers-evil").exists(), "first boot created a file through a planted link"
    assert signers.read_text() == "appliance-bundle the operator's key\n", "the link's target is untouched"
    report = state / "firstboot.json"
    assert not report.is_symlink() and json.loads(report.read_text())["applied"] == ["hostname: planted-links"]
