"""Power cuts on the amd64 twin (QEMU killed with SIGKILL: no shutdown, the guest's page cache lost) at seeded
moments of an update, and a new release that never comes up. After each cut the card's root file system must be
clean, the twin must boot and serve within the usual bound, run one whole release (old or new, every file as
installed), and the boot counting must have kept a release that served.

One boot serves two cuts' worth of checking: cut, check the file system, boot, check, start the next update, cut.
The moments come from ``APPLIANCE_POWERCUT_SEED`` (default below); each test prints its schedule and outcomes.
``make test`` cuts once within seconds of a switch (``APPLIANCE_POWERCUT_CUTS``, default 1: the CI budget); ``make
test-long`` also cuts during the copy and runs the self-rollback on the twin (both marked ``long``), five cuts at
each kind of moment, as the issue asks and as docs/image.md's figures were measured. (The boot counting itself is
in ``make test`` through tests/system/test_install_safety.py, with the release's own ``appliance serve``.)
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from image import bundle as bundles
from image import disk
from tests.support import tiny_models
from tests.support.devices import new_card, wait_status
from tests.support.powercut import READY_WITHIN, CardDevice, card_settings

pytestmark = pytest.mark.image

SEED = int(os.environ.get("APPLIANCE_POWERCUT_SEED", "1212"))
CUTS = int(os.environ.get("APPLIANCE_POWERCUT_CUTS", "1"))  # per kind of moment; `make test-long`: 5
SWITCH_WINDOW = (0.0, 4.0)  # seconds after the switch
SENSOR, SECRET = "power-sensor", "a long power password"
VERSIONS = [f"0.2.{i}" for i in range(1, CUTS + 2)]  # one more than the cuts: (b) measures a copy first
GUEST_BUNDLES = "/mnt/bundles"


@pytest.fixture(scope="module")
def update_bundles(bundle_amd64, signing_key, tmp_path_factory) -> dict[str, Path]:
    """Releases 0.2.1 ... each with a model of its own (so every update copies one into the store), and 0.2.9,
    whose catalog states a wrong digest for its model: it installs, and never serves."""
    out = tmp_path_factory.mktemp("update-bundles")
    built = {}
    for number, version in enumerate([*VERSIONS, "0.2.9"]):
        model = tiny_models.write_llama(out / f"tiny-{version}.gguf", seed=100 + number)
        catalog = out / f"catalog-{version}.toml"
        catalog.write_text(tiny_models.catalog_entry("tiny", model, absolute=True, template="chatml",
                                                     commercial_use=True))
        built[version] = bundles.build("amd64", out / "dist", catalog=catalog, key=signing_key, version=version,
                                       tarball=False)
    broken = built["0.2.9"] / "models/catalog.toml"
    import re
    broken.write_text(re.sub(r'sha256 = "[0-9a-f]{64}"', 'sha256 = "' + "0" * 64 + '"', broken.read_text()))
    bundles.write_manifest(built["0.2.9"])
    bundles.sign(built["0.2.9"], signing_key)
    return built


@pytest.fixture(scope="module")
def bundle_disk(update_bundles, tmp_path_factory) -> Path:
    """The bundles on a disk of their own (ext2, read-only in the guest): a USB stick, not the network."""
    root = next(iter(update_bundles.values())).parent
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    image = tmp_path_factory.mktemp("bundle-disk") / "bundles.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-L", "bundles", "-d", str(root), str(image),
                    f"{size // 2**20 * 5 // 4 + 64}M"], check=True)
    return image


@pytest.fixture
def device(amd64_image, bundle_disk, tmp_path):
    key = tmp_path / "operator"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    card = new_card(amd64_image, tmp_path / "card.img")
    disk.write_boot_file(card, "authorized_keys", (tmp_path / "operator.pub").read_bytes())
    disk.write_boot_file(card, "appliance.toml", card_settings("cut-01", SENSOR, SECRET))
    return CardDevice(card, key, tmp_path, drives=(bundle_disk,))


def start(device: CardDevice, first: bool = False) -> float:
    """Power on, serve (within the bound after a cut; the first boot, which grows the root and makes the keys, is
    setup), and plug the bundle disk in."""
    device.power_on()
    ready = device.wait_ready(timeout=600 if first else READY_WITHIN)
    device.ssh(f"sudo mkdir -p {GUEST_BUNDLES} && sudo mount -o ro /dev/vdb {GUEST_BUNDLES}")
    return ready


def install_command(bundle: Path, *extra: str) -> str:
    return (f"sudo appliance-install-bundle install {' '.join(extra)} {GUEST_BUNDLES}/{bundle.name} "
            f"&& sudo systemctl daemon-reload && sudo systemctl restart --no-block appliance")


def after_the_cut(device: CardDevice, old: str, new: str) -> dict:
    """Everything that must hold after a cut: the file system, the bound, one whole release serving, the trial."""
    fsck = device.check_filesystem()
    ready = start(device)
    state = device.releases()
    current = state["current"]
    assert current["name"] in (old, new), state
    assert current["stamp"] and current["bad"] == [] and current["files"] > 1000, \
        f"current is not one whole release: {current}"
    assert current["version"] == current["name"], state
    assert state["previous"] is None or state["previous"]["stamp"], state
    status = kept(device)
    assert status["version"] == current["version"] and status["release"]["name"] == current["name"], \
        "the service runs the release `current` names"
    assert device.journal_errors() == []
    return {"fsck": fsck, "ready_s": round(ready, 1), "release": current["name"], "unstamped": state["unstamped"]}


def kept(device: CardDevice) -> dict:
    """The service's status once it serves and the boot counting has kept its release (ExecStartPost runs just
    after READY=1, which a release on trial sends once it serves)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = device.http_status()
        except OSError:  # the service restarting: the forwarded port resets the connection
            status = {}
        listed = device.installer("list")
        if status.get("state") == "ready" and listed["trial"] is None:
            assert listed["rolled_back"] is None, listed
            return status
        time.sleep(2)
    raise AssertionError(f"not serving with its trial over: {status}, {listed}")


def report(kind: str, rows: list[dict], started: float) -> None:
    counts = collections.Counter(row["outcome"] for row in rows)
    print(f"\n{kind}: seed {SEED}, {len(rows)} cuts, {dict(counts)}, {time.monotonic() - started:.0f} s")
    for row in rows:
        print("  ", row)


def test_power_cuts_within_seconds_of_the_switch(device, update_bundles):
    started = time.monotonic()
    rng = random.Random(f"{SEED}:switch")
    delays = [round(rng.uniform(*SWITCH_WINDOW), 2) for _ in range(CUTS)]
    rows = []
    start(device, first=True)
    old = "0.1.0"
    for version, delay in zip(VERSIONS[:CUTS], delays, strict=True):
        cut = device.run_and_cut(install_command(update_bundles[version]), marker=f"switched current to {version}",
                                 delay=delay)
        row = after_the_cut(device, old, version)
        row.update(outcome="new" if row["release"] == version else "old", delay_s=delay, cut_at_s=cut.at,
                   idle_when_cut=cut.finished_first)
        rows.append(row)
        print(f"\ncut {len(rows)}: {row}", flush=True)
        old = row["release"]
    device.power_off()
    device.check_filesystem()
    report("cuts 0-4 s after the switch", rows, started)


@pytest.mark.long
def test_power_cuts_in_the_middle_of_the_copy(device, update_bundles):
    started = time.monotonic()
    rng = random.Random(f"{SEED}:copy")
    fractions = [round(rng.uniform(0.05, 0.95), 3) for _ in range(CUTS)]
    start(device, first=True)
    # an update with no cut first, to learn how long the copy takes on this machine
    marks = device.run_marked(install_command(update_bundles[VERSIONS[0]]), ("copying the venv", "switched current"))
    copy_s = marks["switched current"] - marks["copying the venv"]
    kept(device)
    rows, old = [], VERSIONS[0]
    for version, fraction in zip(VERSIONS[1:], fractions, strict=True):
        cut = device.run_and_cut(install_command(update_bundles[version]), marker="copying the venv",
                                 delay=fraction * copy_s)
        row = after_the_cut(device, old, version)
        interrupted = row["release"] == old
        assert not interrupted or version in row["unstamped"] or "switched current" not in cut.output
        row.update(outcome="old, copy interrupted" if interrupted else "new", delay_s=round(fraction * copy_s, 1),
                   cut_at_s=cut.at)
        rows.append(row)
        print(f"\ncut {len(rows)}: {row}", flush=True)
        old = row["release"]
    # the last interrupted update, done again, completes and clears what the cuts left
    last = VERSIONS[-1]
    device.run_marked(install_command(update_bundles[last]), ())
    state = device.releases()
    assert state["current"]["name"] == last and state["unstamped"] == [], state
    leftovers = device.ssh("sudo find /var/lib/appliance/models -name '.*'")
    assert leftovers.strip() == "", f"half-copied model files left: {leftovers}"
    device.power_off()
    device.check_filesystem()
    report(f"cuts during the copy (copy {copy_s:.1f} s uncut)", rows, started)


@pytest.mark.long
def test_a_release_that_never_serves_goes_back_by_itself(device, update_bundles):
    """No Ansible: the broken release's starts give up, systemd starts it again, the fourth start runs the previous
    release, and the retained status a sensor reads says what happened."""
    start(device, first=True)
    began = time.monotonic()
    device.ssh(install_command(update_bundles["0.2.9"], "--trial-ready-within", "120"), timeout=900)
    deadline = time.monotonic() + 900
    while (listed := device.installer("list"))["rolled_back"] is None and time.monotonic() < deadline:
        time.sleep(5)
    assert listed["rolled_back"] is not None, device.ssh("sudo journalctl -u appliance -b --no-pager")[-4000:]
    took = time.monotonic() - began
    assert listed["current"] == "0.1.0" and listed["previous"] == "0.2.9" and listed["trial"] is None, listed
    assert listed["rolled_back"]["from"] == "0.2.9" and listed["rolled_back"]["starts"] == 3
    status, _ = wait_status(device.vm, "cut-01",
                            lambda s: s["state"] == "ready" and (s.get("release") or {}).get("rolled_back"),
                            time.monotonic() + 180, SENSOR, SECRET)
    assert status["release"]["name"] == "0.1.0" and status["version"] == "0.1.0"
    assert any("did not reach ready in 3 starts" in w for w in status["warnings"]), status
    journal = device.ssh("sudo journalctl -u appliance -b --no-pager -o short-monotonic")
    assert journal.count("status=75") >= 3, journal[-4000:]
    print(f"\nwent back by itself {took:.0f} s after the update was switched to:")
    for line in journal.splitlines():
        if any(k in line for k in ("status=75", "went back", "giving this start up", "Started", "systemd keeps")):
            print("  ", line[:220])
    shutil.copy(device.vm.console, device.workdir / "console-rollback.log")
