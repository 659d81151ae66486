"""The device's installer under the conditions a device in the field meets: a power cut at any moment (everything an
install writes reaches the card before the stamp and the switch that depend on it), a service account that plants
links for root to follow, an old signed bundle offered as an update, and a new release that never comes up (boot
counting: the device goes back by itself). Real bundles, the installer's zipapp run by Debian's python3, the
release's own `appliance serve` with a systemd notify socket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.supervisor.release_trial import TRIAL_FAILED
from appliance.transports.broker import free_port
from image import bundle as bundles
from tests.support import tiny_models
from tests.support.devices import SYSTEM_PYTHON, install
from tests.support.harness import http_get


def _bundle(tmp_path, models_dir, signing_key, version: str, *, model: str = "tiny-q4_0.gguf",
            broken: bool = False) -> Path:
    """A bundle of ``version`` serving ``model`` as `tiny`; ``broken``: its catalog states a wrong digest, so the
    release installs but its default model never loads (a bad release, not a tampered bundle)."""
    catalog = tmp_path / f"catalog-{version}.toml"
    catalog.write_text(tiny_models.catalog_entry("tiny", models_dir / model, absolute=True, template="chatml"))
    built = bundles.build("amd64", tmp_path / "dist", catalog=catalog, key=signing_key, version=version,
                          tarball=False)
    if broken:
        path = built / "models/catalog.toml"
        path.write_text(re.sub(r'sha256 = "[0-9a-f]{64}"', 'sha256 = "' + "0" * 64 + '"', path.read_text()))
        bundles.write_manifest(built)
        bundles.sign(built, signing_key)
    return built


def _tree(path: Path) -> dict[str, bytes | str]:
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink()
                                             else os.readlink(p) if p.is_symlink() else "dir")
            for p in sorted(path.rglob("*"))}


# -- durability -------------------------------------------------------------------------------------------------

TRACED = "syncfs,fsync,fdatasync,rename,renameat,renameat2,symlink,symlinkat,openat,open,creat,mkdir,mkdirat"


def _trace(log: Path) -> list[tuple[str, str]]:
    """(syscall, the rest of its line) in order, from ``strace -f -y``; failed calls left out."""
    calls = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.match(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if match and not match.group(3).startswith("-"):
            calls.append((match.group(1), match.group(2) + " = " + line.rsplit("=", 1)[1]))
    return calls


def test_an_install_is_on_the_card_before_anything_vouches_for_it(bundle_amd64, models_dir, signing_key, tmp_path):
    """strace of a real update: every file of the release is written before one syncfs, the `.complete` stamp
    after it (fsync, rename, directory fsync), a model file copied into the store is fsynced before its rename,
    the trial is written before `current` moves, and `current` moves after a flush, with its directory fsynced."""
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    newer = _bundle(tmp_path, models_dir, signing_key, "0.1.1", model="tiny-f32.gguf")
    log = tmp_path / "strace.log"
    signers = device / "bundle-signers"
    result = subprocess.run(["strace", "-f", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(log), SYSTEM_PYTHON,
                             str(newer / "bin/appliance-install-bundle"), "--signers", str(signers), "--prefix",
                             str(device / "opt"), "--state-dir", str(device / "state"), "--units-dir",
                             str(device / "units"), "--tool", str(device / "sbin/appliance-install-bundle"),
                             "install", str(newer)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    calls = _trace(log)
    release, opt, store = (str(device / p) for p in ("opt/releases/0.1.1", "opt", "state/models"))

    def first(predicate, start: int = 0) -> int:
        return next(i for i, call in enumerate(calls) if i >= start and predicate(*call))

    def last(predicate) -> int:
        return max(i for i, call in enumerate(calls) if predicate(*call))

    def renamed_to(directory: str, name: str):
        return lambda call, args: call.startswith("rename") and f'<{directory}>, "{name}"' in args

    def fsync_of(path: str):
        pattern = re.compile(rf"^\d+<{re.escape(path)}>")
        return lambda call, args: call == "fsync" and pattern.match(args) is not None

    def created_under(path: str, but: str = "\0"):
        return lambda call, args: (call in ("open", "openat", "creat") and "O_CREAT" in args
                                   and f"<{path}/" in args.rsplit(" = ", 1)[-1] and but not in args)

    def flushed_between(start: int, end: int) -> bool:
        return any(calls[i][0] == "syncfs" for i in range(start, end))

    stamp = first(renamed_to(release, ".complete"))
    last_file = last(created_under(release, but=".complete."))
    assert last_file < stamp and flushed_between(last_file, stamp), \
        "every file of the release is written, then flushed as a whole, before the stamp vouches for it"
    assert first(lambda call, args: call == "fsync" and f"<{release}/" in args and ".complete." in args) < stamp, \
        "the stamp's own data first"
    assert first(fsync_of(release), stamp) > stamp, "then the directory that names it"

    stored = first(lambda call, args: call.startswith("rename") and f"<{store}>" in args and "tiny-f32.gguf" in args
                   and ".tmp" not in args.rsplit(",", 1)[-1])
    assert first(lambda call, args: call == "fsync" and f"<{store}/." in args and "tiny-f32.gguf" in args) < stored
    assert first(fsync_of(store), stored) > stored

    switched = first(renamed_to(opt, "current"))
    assert first(renamed_to(opt, "trial.json")) < switched, "the trial is on the card before the switch it guards"
    last_anywhere = max(last(created_under(release)), last(created_under(store)))
    assert flushed_between(last_anywhere, switched), "everything flushed before the switch"
    assert first(fsync_of(opt), switched) > switched, "and the switch itself"
    assert (device / "opt/current").resolve().name == "0.1.1"


# -- links the service could plant ------------------------------------------------------------------------------

@pytest.fixture
def as_root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root: the threat is root following a link another account planted")


@pytest.mark.parametrize("plant", ["models is a link", "models is the service's own directory"])
def test_root_never_follows_a_link_the_service_planted(bundle_amd64, signing_key, tmp_path, as_root_only, plant):
    """The state directory is the service's (as /var/lib/appliance on a device): it replaces the model store by a
    link to a directory of root's, or by a directory of its own holding links where root will write."""
    device = tmp_path / "device"
    state = device / "state"
    state.mkdir(parents=True)
    victim = tmp_path / "etc-appliance"
    victim.mkdir()
    (victim / "bundle-signers").write_text("appliance-bundle namespaces=\"appliance-bundle\" the operator's key\n")
    before = _tree(victim)
    if plant == "models is a link":
        (state / "models").symlink_to(victim)
    else:
        (state / "models").mkdir()
        digest = hashlib.sha256((bundle_amd64 / "models/tiny-q4_0.gguf").read_bytes()).hexdigest()
        for name in (f"{digest[:16]}-tiny-q4_0.gguf", f"{digest[:16]}-tiny-q4_0.gguf.partial"):
            (state / "models" / name).symlink_to(victim / "bundle-signers")
        os.chown(state / "models", 65534, 65534)
    os.chown(state, 65534, 65534)

    result, _ = install(bundle_amd64, device, signing_key)
    assert result.returncode == 1, result.stderr
    assert "refused" in result.stderr and str(state / "models") in result.stderr, result.stderr
    assert _tree(victim) == before, "the link's target is untouched"
    assert not (device / "opt/current").exists(), "and nothing was switched to"


# -- downgrades -------------------------------------------------------------------------------------------------

def test_an_older_bundle_is_refused_unless_the_operator_allows_it(bundle_amd64, tiny_catalog, signing_key, tmp_path):
    newer = bundles.build("amd64", tmp_path / "dist", catalog=tiny_catalog, key=signing_key, version="0.1.1",
                          tarball=False)
    device = tmp_path / "device"
    assert install(newer, device, signing_key)[0].returncode == 0
    before = _tree(device / "opt")
    for args in ((), ("--no-activate",)):
        result, _ = install(bundle_amd64, device, signing_key, *args)
        assert result.returncode == 1
        assert "version 0.1.0, older than the running release 0.1.1 (0.1.1): a downgrade" in result.stderr, \
            result.stderr
        assert "--allow-downgrade" in result.stderr
    assert _tree(device / "opt") == before, "nothing installed"
    result, body = install(bundle_amd64, device, signing_key, "--allow-downgrade")
    assert result.returncode == 0 and body["activated"], result.stderr
    assert (device / "opt/current").resolve().name == "0.1.0"
    result, body = install(None, device, signing_key, command="rollback", tool=newer / "bin/appliance-install-bundle")
    assert result.returncode == 0 and body["release"] == "0.1.1", "rollback needs no bundle and is no downgrade"


# -- boot counting ----------------------------------------------------------------------------------------------

class Serve:
    """The current release's own `appliance serve`, as systemd starts it (a notify socket to read READY=1)."""

    def __init__(self, device: Path, tmp_path: Path) -> None:
        self.port = free_port()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = tmp_path / f"notify-{self.port}.sock"
        self.notify.bind(str(address))
        self.notify.settimeout(0.2)
        config = tmp_path / f"serve-{self.port}.toml"
        config.write_text(f'[device]\nid = "trial"\nstate_dir = "{device / "state"}"\n[mqtt]\nenabled = false\n'
                          f'[http]\nport = {self.port}\n[models]\ndefault = "tiny"\n'
                          f'catalog = "{device / "opt/current/models/catalog.toml"}"\n')
        self.process = subprocess.Popen([str(device / "opt/current/venv/bin/appliance"), "serve", "-c", str(config)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "NOTIFY_SOCKET": str(address)})
        self.messages: list[str] = []

    def read_notify(self) -> None:
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def status(self) -> dict | None:
        try:
            code, body = http_get(f"http://127.0.0.1:{self.port}/status", timeout=5)
            return json.loads(body) if code == 200 else None
        except OSError:
            return None

    def wait(self, predicate, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_notify()
            if (status := self.status()) is not None and predicate(status):
                return status
            assert self.process.poll() is None, self.process.stdout.read()[-3000:]
            time.sleep(0.3)
        raise AssertionError(f"status never matched; last: {self.status()}")

    def ready_sent(self) -> bool:
        self.read_notify()
        return any("READY=1" in m for m in self.messages)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        out = self.process.communicate(timeout=60)[0]
        self.notify.close()
        return out


def trial(device: Path, signing_key: Path, event: str, tool: Path) -> dict:
    result, body = install(None, device, signing_key, event, command="trial", tool=tool)
    assert result.returncode == 0, result.stderr
    return body


def test_a_release_that_never_serves_goes_back_by_itself(bundle_amd64, models_dir, signing_key, tmp_path):
    """No Ansible, no operator: each start of the broken release gives up (no READY=1), the fourth start is the
    previous release's, which says in its status what happened."""
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    broken = _bundle(tmp_path, models_dir, signing_key, "0.1.1", broken=True)
    result, body = install(broken, device, signing_key, "--trial-ready-within", "60")
    assert result.returncode == 0 and body["activated"], result.stderr
    tool = device / "sbin/appliance-install-bundle"

    assert trial(device, signing_key, "start", tool)["trial"]["starts"] == 1  # ExecStartPre
    serve = Serve(device, tmp_path)
    assert serve.process.wait(timeout=120) == TRIAL_FAILED, "the start gives up (Restart=on-failure counts it)"
    assert not serve.ready_sent(), "no READY=1: systemd's ExecStartPost must not keep this release"
    out = serve.stop()
    assert "release 0.1.1 on trial, start 1 of 3" in out and "sha256" in out, out[-2000:]

    for start in (2, 3):
        assert trial(device, signing_key, "start", tool)["trial"]["starts"] == start
    body = trial(device, signing_key, "start", tool)
    assert body["rolled_back"]["from"] == "0.1.1" and body["rolled_back"]["to"] == "0.1.0"
    assert (device / "opt/current").resolve().name == "0.1.0"
    listed = install(None, device, signing_key, command="list", tool=tool)[1]
    assert listed["trial"] is None and listed["rolled_back"]["starts"] == 3 and listed["previous"] == "0.1.1"

    serve = Serve(device, tmp_path)  # the same start of the unit now runs the previous release
    try:
        status = serve.wait(lambda s: s["state"] == "ready")
        assert serve.ready_sent()
        assert status["release"]["name"] == "0.1.0" and status["release"]["rolled_back"]["from"] == "0.1.1"
        assert any("did not reach ready in 3 starts; the device went back to 0.1.0 by itself" in w
                   for w in status["warnings"]), status["warnings"]
    finally:
        serve.stop()
    assert trial(device, signing_key, "ready", tool) == {"changed": False}


def test_a_release_that_serves_is_kept(bundle_amd64, models_dir, signing_key, tmp_path):
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    good = _bundle(tmp_path, models_dir, signing_key, "0.1.1")
    assert install(good, device, signing_key)[0].returncode == 0
    tool = device / "sbin/appliance-install-bundle"
    trial(device, signing_key, "start", tool)
    trial(device, signing_key, "start", tool)  # a power cut during the first start: counted too
    serve = Serve(device, tmp_path)
    try:
        early = serve.wait(lambda s: True)
        assert early["release"]["trial"] == {"start": 2, "of": 3, "back_to": "0.1.0", "ready_within_s": 600}
        # READY=1 seen before a status that still says "not serving" is READY sent too early; READY seen after one
        # is the service becoming ready in between (a CI run caught that race when READY was read second)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sent_before = serve.ready_sent()
            status = serve.status()
            if status is not None and status["state"] in ("ready", "busy"):
                break
            assert not sent_before, f"READY=1 waits until the release serves (status: {status})"
            time.sleep(0.1)
        serve.wait(lambda s: s["state"] == "ready")
        deadline = time.monotonic() + 10
        while not serve.ready_sent() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serve.ready_sent()
    finally:
        serve.stop()
    assert trial(device, signing_key, "ready", tool) == {"changed": True, "kept": "0.1.1", "starts": 2}
    assert trial(device, signing_key, "start", tool) == {"changed": False, "trial": None}, "no longer counted"
    assert (device / "opt/current").resolve().name == "0.1.1"


def test_a_trial_left_by_a_power_cut_before_the_switch_is_dropped(bundle_amd64, tiny_catalog, signing_key,
                                                                   tmp_path):
    from appliance.release import trial as trials
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    trials.save(device / "opt", trials.Trial(release="0.1.1", previous="0.1.0"))  # written, then the power went
    tool = device / "sbin/appliance-install-bundle"
    assert trial(device, signing_key, "start", tool) == {"changed": True, "trial": None, "stale": "0.1.1"}
    assert not (device / "opt/trial.json").exists() and (device / "opt/current").resolve().name == "0.1.0"


def test_what_an_interrupted_install_left_is_removed_by_the_next(bundle_amd64, tiny_catalog, signing_key, tmp_path):
    """A power cut mid-install leaves a release without its stamp and maybe a half-copied model file; one seconds
    after a switch stops the prune that follows it, leaving an old complete release. The next install removes them
    before it writes: a few such releases (250 MiB each) fill a card."""
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    stale = device / "opt/releases/0.0.9"
    subprocess.run(["cp", "-a", str(device / "opt/releases/0.1.0"), str(stale)], check=True)
    half = device / "opt/releases/0.1.5"
    (half / "venv/lib").mkdir(parents=True)
    (half / "venv/lib/big.so").write_bytes(b"\0" * 2**20)
    (device / "state/models/.0123456789abcdef-tiny.gguf.1a2b3c4d.tmp").write_bytes(b"half")
    newer = bundles.build("amd64", tmp_path / "dist", catalog=tiny_catalog, key=signing_key, version="0.1.1",
                          tarball=False)
    result, body = install(newer, device, signing_key)
    assert result.returncode == 0, result.stderr
    assert {str(half), str(stale)} <= set(body["removed"]) and not half.exists() and not stale.exists()
    assert [p.name for p in (device / "state/models").iterdir() if p.name.startswith(".")] == []
