"""The appliance role sends a device only the software files it lacks: its tasks/send.yml run by ansible-playbook
on this machine (a staging directory in tmp stands for the device's; the fleet test runs the whole role on booted
devices). An update links what an earlier release staged and sends the rest, a second run sends nothing, and
neither a link nor a damaged or unlisted file in the staging directory is used."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.harness import REPO

ROLES = REPO / "ansible" / "roles"


def make_bundle(path: Path, release: str, files: dict[str, bytes]) -> Path:
    """A bundle as the role reads it: bundle.toml, the files, a MANIFEST of them all and a (never checked here)
    signature; the installer, which checks it, is not part of these tasks."""
    files = {"bundle.toml": f'release = "{release}"\n'.encode(), **files}
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    (path / "MANIFEST").write_text("".join(f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
                                           for rel, data in sorted(files.items())))
    (path / "MANIFEST.sig").write_text("not checked by these tasks\n")
    return path


def send(tmp_path: Path, bundle: Path, release: str, staging: Path) -> tuple[dict, dict[str, str]]:
    """One ansible-playbook run of send.yml: (the gather script's answer, {task: ok|changed|skipping})."""
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local",
             "vars": {"ansible_python_interpreter": sys.executable, "appliance_bundle": str(bundle),
                      "appliance_release": release, "appliance_staging_dir": str(staging)},
             "tasks": [{"ansible.builtin.include_role": {"name": "appliance", "tasks_from": "send"}},
                       {"name": "Show the answer", "ansible.builtin.debug": {"var": "appliance_gathered.stdout"}}]}]
    playbook = tmp_path / "send.yml"
    playbook.write_text(json.dumps(play))
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    result = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
                             str(playbook)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1",
                                 "ANSIBLE_LOCALHOST_WARNING": "False", "TMPDIR": str(control)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    tasks = dict(re.findall(r"^TASK \[(?:appliance : )?(.+?)\] \**\n(?:.*\n)*?(ok|changed|skipping): \[localhost\]",
                            result.stdout, re.M))
    shown = re.search(r'"appliance_gathered.stdout": (".*")', result.stdout)
    assert shown, result.stdout
    assert not list(control.iterdir()), "the packed file is removed from the control machine"
    return json.loads(json.loads(shown.group(1))), tasks


def software(root: Path) -> dict[str, bytes]:
    """The files under a bundle or a staged release outside models/ (the models role's part), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != "models"}


def test_only_what_the_device_lacks_is_sent(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o750)
    numpy, llama, old_app = os.urandom(300_000), os.urandom(200_000), b"appliance 0.1.0" * 1000
    first = make_bundle(tmp_path / "b1", "0.1.0", {
        "wheels/numpy.whl": numpy, "wheels/llama.whl": llama, "wheels/appliance-0.1.0.whl": old_app,
        "systemd/appliance.service": b"[Unit]\n", "bin/appliance-install-bundle": b"#!/usr/bin/python3\n",
        "models/tiny.gguf": b"the models role sends these"})

    gathered, _ = send(tmp_path, first, "0.1.0", staging)
    assert gathered == {"linked": [], "removed": [], "missing": [
        "bin/appliance-install-bundle", "systemd/appliance.service", "wheels/appliance-0.1.0.whl",
        "wheels/llama.whl", "wheels/numpy.whl"]}, "nothing staged yet: every software file is sent, no model"
    assert software(staging / "0.1.0") == software(first)
    assert not (staging / "0.1.0.tar").exists(), "the tar is unpacked and removed"

    gathered, tasks = send(tmp_path, first, "0.1.0", staging)
    assert gathered == {"linked": [], "removed": [], "missing": []}
    assert [name for name, status in tasks.items() if status == "changed"] == [], "a second run changes nothing"
    assert [name for name, status in tasks.items() if status == "skipping"] == [
        "Pack them into one file on the control machine", "Send them", "Unpack them next to the rest",
        "Remove the packed file from the control machine"]

    # the next release changes the appliance's wheel and adds one; a leftover of an earlier attempt, a damaged
    # copy and a link planted in the earlier release's directory must not be used
    second = make_bundle(tmp_path / "b2", "0.1.1", {
        "wheels/numpy.whl": numpy, "wheels/llama.whl": llama, "wheels/appliance-0.1.1.whl": b"appliance 0.1.1",
        "wheels/new-dependency.whl": b"new", "systemd/appliance.service": b"[Unit]\n",
        "bin/appliance-install-bundle": b"#!/usr/bin/python3\n", "models/tiny.gguf": b"the models role sends these"})
    (staging / "0.1.1" / "wheels").mkdir(parents=True)
    (staging / "0.1.1" / "wheels" / "appliance-0.0.9.whl").write_bytes(b"left by an earlier attempt")
    (staging / "0.1.1" / "wheels" / "llama.whl").write_bytes(llama[:1000])  # a copy cut short by a power cut
    (staging / "0.1.1" / "models").mkdir()
    (staging / "0.1.1" / "models" / "tiny.gguf").write_bytes(b"the models role's business")
    outside = tmp_path / "outside.service"
    outside.write_bytes(b"[Unit]\n")
    (staging / "0.1.0" / "systemd" / "appliance.service").unlink()
    (staging / "0.1.0" / "systemd" / "appliance.service").symlink_to(outside)

    gathered, _ = send(tmp_path, second, "0.1.1", staging)
    assert gathered == {
        "linked": ["bin/appliance-install-bundle", "wheels/llama.whl", "wheels/numpy.whl"],
        "removed": ["wheels/appliance-0.0.9.whl"],
        "missing": ["systemd/appliance.service", "wheels/appliance-0.1.1.whl", "wheels/new-dependency.whl"]}, \
        "held files linked (the damaged one replaced), the link not followed, the changed and new ones sent"
    assert software(staging / "0.1.1") == software(second)
    assert (staging / "0.1.1" / "wheels" / "numpy.whl").stat().st_ino == \
        (staging / "0.1.0" / "wheels" / "numpy.whl").stat().st_ino, "linked, not copied: no second 80 MB on the card"
    assert not (staging / "0.1.1" / "systemd" / "appliance.service").is_symlink()
    assert (staging / "0.1.1" / "models" / "tiny.gguf").read_bytes() == b"the models role's business"

    gathered, tasks = send(tmp_path, second, "0.1.1", staging)
    assert gathered == {"linked": [], "removed": [], "missing": []}
    assert [name for name, status in tasks.items() if status == "changed"] == []
