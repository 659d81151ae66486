"""The appliance role's config, rendered by ansible-playbook from the role's own vars and template (the fleet test
runs the whole role on devices; this checks its cases in seconds): keys set at first boot are kept, an API key is
deployed or kept, the API reaches the network only with a key or the opt-in, and a key the role stops setting
goes away."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.support.harness import REPO

ROLE = REPO / "ansible" / "roles" / "appliance"
IMAGE = tomllib.loads((REPO / "image/overlay/etc/appliance/appliance.toml").read_text())
FIRST_BOOT = {**IMAGE, "device": {**IMAGE["device"], "id": "pi-07"}, "worker": {"max_queue": 6},
              "http": {"bind": "0.0.0.0", "port": 8080, "api_key_file": "/etc/appliance/api-key"}}


DEFAULTS = yaml.safe_load((ROLE / "defaults/main.yml").read_text())


def render(tmp_path: Path, cases: dict[str, tuple[dict, dict | None, dict]]) -> dict[str, tuple[dict, dict]]:
    """For each case (the device's config, the role's record of its last run or None, inventory variables): the
    config the role renders and its new record. One ansible-playbook run, one play per case."""
    plays = []
    for name, (device, before, inventory) in cases.items():
        record = {"content": base64.b64encode(json.dumps(before).encode()).decode()} if before is not None else {}
        plays.append({
            "name": name, "hosts": "localhost", "gather_facts": False, "connection": "local",
            "vars": {**DEFAULTS, "ansible_python_interpreter": sys.executable, "appliance_device_id": "pi-07",
                     "appliance_release": "0.1.0", "appliance_device_config": {"stdout": json.dumps(device)},
                     "appliance_settings_record_read": record, **inventory},
            "vars_files": [str(ROLE / "vars/main.yml")],
            "tasks": [{"ansible.builtin.template": {"src": str(ROLE / "templates/appliance.toml.j2"),
                                                    "dest": str(tmp_path / f"{name}.toml")}},
                      {"ansible.builtin.copy": {"content": "{{ appliance_settings | to_json }}",
                                                "dest": str(tmp_path / f"{name}.json")}}]})
    playbook = tmp_path / "render.yml"
    playbook.write_text(json.dumps(plays))
    result = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
                             str(playbook)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {name: (tomllib.loads((tmp_path / f"{name}.toml").read_text()),
                   json.loads((tmp_path / f"{name}.json").read_text())) for name in cases}


def rendered(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.toml").read_text()


def test_the_roles_config_cases(tmp_path):
    first = render(tmp_path, {
        "first-boot": (FIRST_BOOT, None, {"appliance_config": {"worker": {"context_size": 1024}}}),
        "no-key": (IMAGE, None, {}),
        "anonymous": (IMAGE, None, {"appliance_http_allow_anonymous": True}),
        "vault-key": (IMAGE, None, {"appliance_api_key": "a-key-from-the-vault-0123"}),
        "address": (FIRST_BOOT, None, {"appliance_http_bind": "192.0.2.7"})})

    config, record = first["first-boot"]
    assert config["http"] == {"bind": "0.0.0.0", "port": 8080, "api_key_file": "/etc/appliance/api-key"}, \
        "the key set at first boot is kept, so the API stays on the network"
    assert config["worker"] == {"max_queue": 6, "context_size": 1024}, "first boot's key kept, the role's added"
    assert config["device"]["id"] == "pi-07" and "api_key_file" not in record["http"]
    assert first["no-key"][0]["http"] == {"bind": "127.0.0.1", "port": 8080}, "no key: this device only"
    assert first["anonymous"][0]["http"] == {"bind": "0.0.0.0", "port": 8080, "allow_anonymous": True}
    config, record = first["vault-key"]
    assert config["http"] == {"bind": "0.0.0.0", "port": 8080, "api_key_file": "/etc/appliance/api-key"}
    assert "a-key-from-the-vault" not in json.dumps(config) + json.dumps(record)
    assert first["address"][0]["http"]["bind"] == "192.0.2.7", "an address the inventory sets wins"

    # the next run: the keys the role set the last time are the role's to drop, the others stay
    first_text = rendered(tmp_path, "first-boot")
    second = render(tmp_path, {"first-boot-again": (first["first-boot"][0], first["first-boot"][1], {}),
                               "first-boot-same": (first["first-boot"][0], first["first-boot"][1],
                                                   {"appliance_config": {"worker": {"context_size": 1024}}}),
                               "vault-key-gone": (first["vault-key"][0], first["vault-key"][1], {})})
    assert rendered(tmp_path, "first-boot-same") == first_text, "a second run with the same inventory: no change"
    config, _ = second["first-boot-again"]
    assert config["worker"] == {"max_queue": 6}, "a key the inventory no longer sets goes"
    assert config["http"]["api_key_file"] == "/etc/appliance/api-key", "the card's key still stays"
    assert second["vault-key-gone"][0]["http"] == {"bind": "127.0.0.1", "port": 8080}, \
        "a key taken out of the inventory: this device only again"
