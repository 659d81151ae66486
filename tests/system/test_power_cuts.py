"""Power cuts on the amd64 twin (QEMU killed with SIGKILL: no shutdown, the guest's page cache lost) at seeded
moments of an update, and a new release that never comes up. After each cut the card's root file system must be
clean, the twin must boot and serve within the usual bound, run one whole release (old or new, every file as
installed), and the boot counting must have kept a release that served.

One boot serves two cuts' worth of checking: cut, check the file system, boot, check, start the next update, cut.
The moments come from ``APPLIANCE_POWERCUT_SEED`` (default below); each test prints its schedule and outcomes.
``make test`` cuts once within seconds of a switch and, on the same boot, once early in a copy
(``APPLIANCE_POWERCUT_CUTS``, default 1: the CI budget), and once with MQTT requests in flight (answered, running
and queued: each must be answered exactly once after the boot); ``make test-long`` also times an uncut copy and
cuts across the whole of it, and runs the self-rollback on the twin (both marked ``long``), five cuts at each kind
of moment, as the issue asks and as docs/image.md's figures were measured. (The boot counting itself is
in ``make test`` through tests/system/test_install_safety.py, with the release's own ``appliance serve``.)
"""

from __future__ import annotations

import collections
import json
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
from tests.support.harness import MqttClient, chunks_by_id, finals_by_id, wait_until
from tests.support.powercut import LAN_MQTT, READY_WITHIN, CardDevice, card_settings

pytestmark = [pytest.mark.image, pytest.mark.quiet]

SEED = int(os.environ.get("APPLIANCE_POWERCUT_SEED", "1212"))
CUTS = int(os.environ.get("APPLIANCE_POWERCUT_CUTS", "1"))  # per kind of moment; `make test-long`: 5
SWITCH_WINDOW = (0.0, 4.0)  # seconds after the switch
# seconds after the copy began, for `make test`'s one cut during a copy: well inside it without an uncut update first
# to time it, as test-long does. The copy is what the installer does between these two lines of its log: the venv
# linked from the running release's, the changed wheel and the release's new model put in, all of it flushed (86 s
# on a loaded machine, about 30 s on a quiet one when the venv was copied whole)
COPY_BEGINS, SWITCHED = "linking the venv", "switched current"
EARLY_IN_THE_COPY = (0.5, 8.0)
SENSOR, SECRET = "power-sensor", "a long power password"
DEVICE_ID = "cut-01"
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


def _card_device(amd64_image, tmp_path, drives: tuple[Path, ...]):
    key = tmp_path / "operator"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    card = new_card(amd64_image, tmp_path / "card.img")
    disk.write_boot_file(card, "authorized_keys", (tmp_path / "operator.pub").read_bytes())
    disk.write_boot_file(card, "appliance.toml", card_settings(DEVICE_ID, SENSOR, SECRET))
    device = CardDevice(card, key, tmp_path, drives=drives)
    yield device
    if device.vm is not None:
        device.vm.stop()


@pytest.fixture
def device(amd64_image, bundle_disk, tmp_path):
    """A card with the update bundles on a second disk."""
    yield from _card_device(amd64_image, tmp_path, (bundle_disk,))


@pytest.fixture
def serving_device(amd64_image, tmp_path):
    """A card alone: for cuts while it answers."""
    yield from _card_device(amd64_image, tmp_path, ())


def start(device: CardDevice, first: bool = False) -> float:
    """Power on, serve (within the bound after a cut; the first boot, which grows the root and makes the keys, is
    setup), and plug the bundle disk in."""
    device.power_on()
    ready = device.wait_ready(timeout=600 if first else READY_WITHIN)
    if device.drives:
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


def test_power_cuts_within_seconds_of_the_switch_and_early_in_a_copy(device, update_bundles):
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
    report("cuts 0-4 s after the switch", rows, started)
    if CUTS == 1:  # `make test`: one cut during a copy too, on this boot (test-long has five, in the test below)
        delay = round(random.Random(f"{SEED}:copy-early").uniform(*EARLY_IN_THE_COPY), 2)
        row = cut_during_the_copy(device, update_bundles, VERSIONS[CUTS], old, delay)
        report("a cut early in the copy", [row], started)
    device.power_off()
    device.check_filesystem()


def cut_during_the_copy(device: CardDevice, update_bundles, version: str, old: str, delay: float) -> dict:
    """An update cut ``delay`` s after its copy began: the old release, whole, unless the copy was done by then."""
    cut = device.run_and_cut(install_command(update_bundles[version]), marker=COPY_BEGINS, delay=delay)
    row = after_the_cut(device, old, version)
    interrupted = row["release"] == old
    assert not interrupted or version in row["unstamped"] or "switched current" not in cut.output
    row.update(outcome="old, copy interrupted" if interrupted else "new", delay_s=round(delay, 1), cut_at_s=cut.at)
    print(f"\ncut during the copy: {row}", flush=True)
    return row


#: more than the appliance takes at once (mosquitto sends it up to twice its Receive Maximum of 5): when the plug is
#: pulled some are answered, one is running, some wait in the appliance and some in the broker
REQUESTS = 12
#: each chunk is a QoS 1 message: what the broker queues for the sensor while it is away (the answers made after the
#: boot, before it reconnects) must stay under mosquitto's max_queued_messages (1000 in the image): 8 x 60 at most
MAX_TOKENS = 60
#: the plug is pulled while a request streams, once the sensor has between these many of its chunks (one a token,
#: about 22 ms each on the twin): far from its end, and long after the answer before it. A cut in the moment between
#: a final reply reaching the broker and its *answered* record reaching the card gets that request answered a second
#: time, the one case docs/operations.md ("Power cuts and MQTT requests") leaves to the requester's id matching; this
#: test is about every other moment. (It used to cut as soon as the broker's save was done, which takes seconds over
#: SSH on the twin while requests are answered: a moment anywhere in a request. One CI run got one answered twice.)
CUT_BETWEEN_CHUNKS = (10, MAX_TOKENS - 25)


def save_the_broker(device: CardDevice) -> str:
    """What mosquitto's 5-minute autosave does (SIGUSR1: write the in-memory database now), then `sync`: the save
    on the card as the file system's next commit would put it. Returns the database's new time stamp."""
    return device.ssh(
        "sudo sh -c 'db=/var/lib/mosquitto/mosquitto.db; before=$(stat -c %y $db 2>/dev/null); "
        "systemctl kill -s USR1 mosquitto; for i in $(seq 200); do now=$(stat -c %y $db 2>/dev/null); "
        "[ -n \"$now\" ] && [ \"$now\" != \"$before\" ] && break; sleep 0.1; done; "
        "[ \"$now\" != \"$before\" ] && sync && echo $now'").strip()


def timeline(messages, cut_clock: float) -> str:
    """The final replies as the sensor got them, in seconds from the cut, with their DUP flag (a broker's own
    redelivery from its save has it set)."""
    lines = []
    for m in messages:
        if (body := json.loads(m.payload))["type"] != "chunk":
            lines.append(f"{m.timestamp - cut_clock:+8.2f} s  {body['id']} {body['type']} DUP {int(m.dup)}")
    return "\n".join(lines)


def test_a_power_cut_with_requests_in_flight(serving_device):
    """Issue 12.4(c): a sensor's QoS 1 requests, all acked by the broker and in its last save, some answered, one
    running and the rest queued when the plug is pulled. After the boot (the file system clean, serving within the
    bound) every request has exactly one final reply: the running and queued ones answered once (the delivery
    journal and the broker's saved queue), the answered ones not again. The sensor's persistent session, saved with
    the broker's, holds the replies made while it was away."""
    device = serving_device
    started = time.monotonic()
    start(device, first=True)
    prefix = f"replies/{SENSOR}/cut"

    def connect() -> MqttClient:
        return MqttClient("127.0.0.1", device.vm.ports[LAN_MQTT], client_id=f"{SENSOR}-requests", username=SENSOR,
                          password=SECRET, session_expiry=3600)

    sensor = connect()
    try:
        sensor.subscribe(prefix + "/#")
        ids = [f"c{n}" for n in range(REQUESTS)]
        for rid in ids:  # publish() returns once the broker's PUBACK is in: accepted
            sensor.publish(f"appliance/{DEVICE_ID}/generate/{SENSOR}",
                           {"id": rid, "prompt": f"request {rid}", "max_tokens": MAX_TOKENS, "stream": True},
                           response_topic=f"{prefix}/{rid}", correlation=rid.encode())
        saved = save_the_broker(device)
        assert saved, "mosquitto did not save on SIGUSR1"

        def mid_flight() -> bool:  # one answered at least, and another in the middle of its run
            messages = list(sensor.messages)
            finals, chunks = finals_by_id(messages), chunks_by_id(messages)
            low, high = CUT_BETWEEN_CHUNKS
            return len(finals) >= 1 and any(low <= n <= high and rid not in finals for rid, n in chunks.items())

        wait_until(mid_flight, "one request answered and another in the middle of its run", 300)
        cut_clock = time.monotonic()
        cut_at = device.cut()
    finally:
        sensor.client.loop_stop()  # its broker is gone with the power: no DISCONNECT to send
    before = list(sensor.messages)
    answered_before, chunks_before = finals_by_id(before), chunks_by_id(before)
    running = set(chunks_before) - set(answered_before)
    assert running and len(answered_before) + len(running) < REQUESTS, (answered_before, chunks_before)

    fsck = device.check_filesystem()
    ready = start(device)
    requester = connect()  # the same session: what was published for it while it was away comes now
    try:
        try:
            wait_until(lambda: len(finals_by_id(before + list(requester.messages))) == REQUESTS,
                       "a final reply to every request", 300)
        except AssertionError as missing:
            got = list(requester.messages)
            finals_after, chunks_after = finals_by_id(got), chunks_by_id(got)
            log = device.ssh("sudo journalctl -b --no-pager -o cat -u appliance -t mosquitto", check=False)
            raise AssertionError(f"{missing}\nbefore the cut: finals {answered_before}, chunks {chunks_before}\n"
                                 f"after: finals {finals_after}, chunks {chunks_after}\n{log[-4000:]}") from None
        time.sleep(5)  # an answer given twice would come now
        after = list(requester.messages)
    finally:
        requester.close()
    finals = {rid: [f["type"] for f in bodies] for rid, bodies in finals_by_id(before + after).items()}
    assert sorted(finals) == sorted(ids)
    twice = {rid: kinds for rid, kinds in finals.items() if len(kinds) != 1}
    assert not twice, f"answered more than once: {twice}\n{timeline(before + after, cut_clock)}"
    assert all(kinds == ["result"] for kinds in finals.values()), finals
    log = device.ssh("sudo journalctl -u appliance -b --no-pager -o cat")
    assert "answering a request accepted before the restart" in log, log[-3000:]
    assert device.journal_errors() == []
    row = {"cut_at_s": round(cut_at, 1), "answered_before": len(answered_before),
           "running": {rid: chunks_before[rid] for rid in sorted(running)}, "answered_after": len(finals_by_id(after)),
           "ready_s": round(ready, 1), "fsck": fsck,
           "journal_answered_again": log.count("answering a request accepted before the restart"),
           "broker_copies_of_answered": log.count("from before the restart handed back (answered")}
    device.cut()
    report("a cut with requests in flight", [{**row, "outcome": "each answered once"}], started)


@pytest.mark.long
def test_power_cuts_in_the_middle_of_the_copy(device, update_bundles):
    started = time.monotonic()
    rng = random.Random(f"{SEED}:copy")
    fractions = [round(rng.uniform(0.05, 0.95), 3) for _ in range(CUTS)]
    start(device, first=True)
    # an update with no cut first, to learn how long the copy takes on this machine
    marks = device.run_marked(install_command(update_bundles[VERSIONS[0]]), (COPY_BEGINS, SWITCHED))
    copy_s = marks[SWITCHED] - marks[COPY_BEGINS]
    kept(device)
    rows, old = [], VERSIONS[0]
    for version, fraction in zip(VERSIONS[1:], fractions, strict=True):
        row = cut_during_the_copy(device, update_bundles, version, old, fraction * copy_s)
        rows.append(row)
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
    status, _ = wait_status(device.vm, DEVICE_ID,
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
