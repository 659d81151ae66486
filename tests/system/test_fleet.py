"""The fleet playbooks on three booted amd64 twins with no route out of their network (QEMU user networking with
restrict=on: only the forwarded SSH, MQTT and HTTP ports reach them): provision, roll out a new bundle, roll out
a broken one that must come back by itself, a second run of site.yml and update.yml changing nothing, and the
fleet's status read without a change on any device.

What each device is given, and must keep through site.yml and update.yml:
- fleet-1: flashed with an HTTP API key, a sensor account and a worker setting on its boot partition; the inventory
  gives it no key: the key, the account and the setting stay, and the API answers the network with that key only;
- fleet-2: its API key comes from the inventory;
- fleet-3: no API key (the API serves the device itself only) and the broker's TLS listener (plain MQTT, passwords
  in clear, on loopback only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from image import bundle as bundles
from image import disk
from image.qemu import Vm
from tests.support.devices import new_card, ssh, wait_serving
from tests.support.harness import REPO, MqttClient, http_get
from tests.support.shipped_broker import make_certificates

pytestmark = pytest.mark.image

ANSIBLE = REPO / "ansible"
HOSTS = ("fleet-1", "fleet-2", "fleet-3")
SENSOR, SECRET = "fleet-sensor", "a long fleet password"
CARD_SENSOR, CARD_SECRET = "card-sensor", "a password from the card"  # fleet-1's, from its boot partition
CARD_KEY, VAULT_KEY = "api-key-from-the-card-0123", "api-key-from-the-vault-4567"
KEYS = {"fleet-1": CARD_KEY, "fleet-2": VAULT_KEY, "fleet-3": None}
TLS_HOST = "fleet-3"
MQTT, HTTP, MQTT_TLS = 1884, 8080, 8883
PLAY_TIMES: dict[str, float] = {}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def control_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("control") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def fleet(amd64_image, control_key, tmp_path_factory):
    """Three devices flashed from the same image, each told its name and the operator's key; fleet-1 also an API
    key, a sensor account and a worker setting."""
    vms = []
    try:
        for name in HOSTS:
            workdir = tmp_path_factory.mktemp(name)
            card = new_card(amd64_image, workdir / "card.img")
            disk.write_boot_file(card, "authorized_keys", Path(str(control_key) + ".pub").read_bytes())
            disk.write_boot_file(card, "hostname", f"{name}\n".encode())
            if name == "fleet-1":
                disk.write_boot_file(card, "appliance.toml", (
                    f'[http]\napi_key = "{CARD_KEY}"\n\n[worker]\nmax_queue = 6\n\n'
                    f'[mqtt_users]\n{CARD_SENSOR} = "{CARD_SECRET}"\n').encode())
            vms.append(Vm(card, [22, MQTT, HTTP, MQTT_TLS], memory_mib=1536, cpus=1, workdir=workdir,
                          offline=True).start())
        for vm in vms:
            wait_serving(vm, control_key, timeout=600)
        yield dict(zip(HOSTS, vms, strict=True))
    finally:
        for vm in vms:
            vm.stop()


@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) for fleet-3's TLS listener, as the sensors reach it (127.0.0.1, forwarded)."""
    return make_certificates(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])


@pytest.fixture(scope="module")
def inventory(fleet, control_key, tls_ca, tmp_path_factory) -> Path:
    hosts = {name: {"ansible_host": "127.0.0.1", "ansible_port": vm.ports[22]} for name, vm in fleet.items()}
    ca, cert, key = tls_ca
    hosts[TLS_HOST].update({"appliance_api_key": "", "mosquitto_tls": True, "mosquitto_tls_cert": str(cert),
                            "mosquitto_tls_key": str(key)})
    body = {"all": {"vars": {
        "ansible_user": "admin", "ansible_ssh_private_key_file": str(control_key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "appliance_default_model": "tiny", "appliance_health_retries": 24, "appliance_health_delay": 5,
        # three emulated machines share two cores here: the supervisor reads the board less often
        "appliance_config": {"supervisor": {"interval": 5.0}},
        "mosquitto_users": {SENSOR: SECRET}},
        "children": {"site_a": {"hosts": {HOSTS[0]: hosts[HOSTS[0]]}},
                     "site_b": {"hosts": {h: hosts[h] for h in HOSTS[1:]}, "vars": {"appliance_api_key": VAULT_KEY}}}}}
    path = tmp_path_factory.mktemp("inventory") / "fleet.json"  # JSON is YAML
    path.write_text(json.dumps(body, indent=2))
    return path


BATCHES = ("-e", json.dumps({"update_batches": [1, 2]}))  # the canary, then the other two together


def play(inventory: Path, playbook: str, bundle: Path | None, label: str, *extra: str):
    """ansible-playbook from the repo's ansible/ directory; (return code, output, {host: recap counts})."""
    command = [_bin("ansible-playbook"), "-i", str(inventory), playbook, *extra]
    if bundle is not None:
        command += ["-e", f"appliance_bundle={bundle}"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ANSIBLE, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
                                 "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_LOG_PATH": str(inventory.parent / "plays.log"),
                                 "TMPDIR": str(inventory.parent)})  # the packed payload stays in the test's dir
    PLAY_TIMES[label] = round(time.monotonic() - started, 1)
    print(f"{label}: {PLAY_TIMES[label]} s")
    recap = {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
             for m in re.finditer(r"^(\S+)\s+:\s+(ok=.*)$", result.stdout, re.M)}
    return result.returncode, result.stdout + result.stderr, recap


def why(out: str, tail: int = 6000) -> str:
    """A failed play's fatal and unreachable lines (they may lie far above the tail), then its tail."""
    fatal = [line for line in out.splitlines() if line.startswith(("fatal:", "failed:")) or "UNREACHABLE" in line]
    return "\n".join(fatal) + "\n...\n" + out[-tail:]


def versions(fleet, control_key) -> dict[str, str]:
    return {name: ssh(vm, control_key, "/opt/appliance/current/venv/bin/appliance --version").split()[-1]
            for name, vm in fleet.items()}


def sensor(name: str, vm, ca: Path, user: str = SENSOR, password: str = SECRET) -> MqttClient:
    """A sensor's connection to one device's broker: TLS on fleet-3, plain MQTT on the others."""
    if name == TLS_HOST:
        return MqttClient("127.0.0.1", vm.ports[MQTT_TLS], username=user, password=password, tls_ca=ca)
    return MqttClient("127.0.0.1", vm.ports[MQTT], username=user, password=password)


def ask(client: MqttClient, name: str, user: str = SENSOR) -> dict:
    try:
        return client.request(f"appliance/{name}/generate/{user}", {"prompt": "hello", "max_tokens": 3},
                              reply_topic=f"replies/{user}/{uuid.uuid4().hex}", timeout=120)[-1]
    finally:
        client.close()


def answers(fleet, ca: Path) -> None:
    """Each device answers a sensor's generate request through its own broker (the account site.yml made)."""
    for name, vm in fleet.items():
        reply = ask(sensor(name, vm, ca), name)
        assert reply["type"] == "result", (name, reply)


def first_boot_and_keys_hold(fleet, control_key, ca: Path) -> None:
    """What the card set on fleet-1 is still there; every API answers the network with its key only, fleet-3's
    not at all; fleet-3 takes MQTT over TLS only."""
    for name, vm in fleet.items():
        base, key = f"http://127.0.0.1:{vm.ports[HTTP]}", KEYS[name]
        if key is None:
            with pytest.raises(OSError):  # nothing listens on the guest's network address
                http_get(base + "/healthz", timeout=10)
            continue
        assert http_get(base + "/healthz")[0] == 200, name
        assert http_get(base + "/v1/models")[0] == 401, name
        assert http_get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200, name
    config = json.loads(ssh(fleet["fleet-1"], control_key, "sudo /opt/appliance/current/venv/bin/appliance config "
                                                            "show /etc/appliance/appliance.toml"))
    assert config["worker"]["max_queue"] == 6 and config["http"]["api_key_file"] == "/etc/appliance/api-key"
    assert ask(sensor("fleet-1", fleet["fleet-1"], ca, CARD_SENSOR, CARD_SECRET), "fleet-1",
               CARD_SENSOR)["type"] == "result", "the account made at first boot still works"
    with pytest.raises((ConnectionRefusedError, OSError)):
        MqttClient("127.0.0.1", fleet[TLS_HOST].ports[MQTT], username=SENSOR, password=SECRET).close()


@pytest.fixture(scope="module")
def bundles_to_roll_out(bundle_amd64, tiny_catalog, signing_key, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet-bundles")
    good = bundles.build("amd64", out, catalog=tiny_catalog, key=signing_key, version="0.1.1", tarball=False)
    broken = bundles.build("amd64", out, catalog=tiny_catalog, key=signing_key, version="0.1.2", tarball=False)
    # signed by the right key and complete, but its catalog states a wrong digest for the model: the release
    # installs, then cannot load its model, so /readyz never says ready (a bad release, not a tampered bundle)
    catalog = broken / "models/catalog.toml"
    catalog.write_text(re.sub(r'sha256 = "[0-9a-f]{64}"', 'sha256 = "' + "0" * 64 + '"', catalog.read_text()))
    bundles.write_manifest(broken)
    bundles.sign(broken, signing_key)
    return good, broken


def test_lint_and_syntax():
    lint = subprocess.run([_bin("ansible-lint")], cwd=ANSIBLE, capture_output=True, text=True, timeout=600)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr
    syntax = subprocess.run([_bin("ansible-playbook"), "--syntax-check", "site.yml", "update.yml", "status.yml"],
                            cwd=ANSIBLE, capture_output=True, text=True, timeout=300)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


def test_the_fleet_is_provisioned_updated_and_rolled_back(fleet, inventory, bundle_amd64, bundles_to_roll_out,
                                                          control_key, tls_ca, tmp_path):
    good, broken = bundles_to_roll_out
    for name, vm in fleet.items():  # offline for real: nothing but the forwarded ports, no package index
        probe = ssh(vm, control_key, "python3 -c \"import urllib.request as u; u.urlopen('https://pypi.org/simple/',"
                    " timeout=10)\" 2>&1 || echo UNREACHABLE")
        assert "UNREACHABLE" in probe, (name, probe)

    rc, out, recap = play(inventory, "site.yml", bundle_amd64, "site.yml (provision)")
    assert rc == 0, why(out)
    assert set(recap) == set(HOSTS) and all(r["failed"] == 0 for r in recap.values())
    rc, out, recap = play(inventory, "site.yml", bundle_amd64, "site.yml again")
    assert rc == 0 and all(r["changed"] == 0 for r in recap.values()), why(out)
    ca = tls_ca[0]
    answers(fleet, ca)
    first_boot_and_keys_hold(fleet, control_key, ca)

    rc, out, recap = play(inventory, "update.yml", good, "update.yml 0.1.1", *BATCHES)
    assert rc == 0, why(out)
    assert versions(fleet, control_key) == dict.fromkeys(HOSTS, "0.1.1")
    for name, vm in fleet.items():  # what was sent is unpacked, and no tar stays on the card
        assert ssh(vm, control_key, "sudo ls /var/lib/appliance-incoming").split() == ["0.1.1"], name
    answers(fleet, ca)
    first_boot_and_keys_hold(fleet, control_key, ca)
    rc, out, recap = play(inventory, "update.yml", good, "update.yml 0.1.1 again", *BATCHES)
    assert rc == 0 and all(r["changed"] == 0 for r in recap.values()), why(out)

    rc, out, recap = play(inventory, "update.yml", broken, "update.yml broken 0.1.2", *BATCHES)
    assert rc != 0
    assert "release 0.1.2 failed its health check on fleet-1 (batch: fleet-1); rolled back to 0.1.1" in out, \
        why(out)
    assert set(recap) == {"fleet-1"}, "the canary's batch failed, so the play stopped before the other batches"
    assert versions(fleet, control_key) == dict.fromkeys(HOSTS, "0.1.1")
    answers(fleet, ca)

    report = tmp_path / "fleet.json"
    rc, out, recap = play(inventory, "status.yml", None, "status.yml", "-e", f"status_report={report}")
    assert rc == 0, why(out, 4000)
    # read-only on the devices: the one change of the play is the report written on the control machine
    assert sum(r["changed"] for r in recap.values()) == 1 and "changed: [fleet-1 -> localhost]" in out, why(out)
    rows = {row["host"]: row for row in json.loads(report.read_text())}
    assert {h: (r["state"], r["version"], r["release"], r["model"]) for h, r in rows.items()} == \
        dict.fromkeys(HOSTS, ("ready", "0.1.1", "0.1.1", "tiny"))
    # the canary went to 0.1.2 and back, so 0.1.2 is the release it came from; the others never left 0.1.1
    assert {h: r["previous"] for h, r in rows.items()} == {"fleet-1": "0.1.2", "fleet-2": "0.1.0",
                                                           "fleet-3": "0.1.0"}
    assert "host" in out and "fleet-2" in out, "the table is printed"
    print("play times (s):", json.dumps(PLAY_TIMES))
