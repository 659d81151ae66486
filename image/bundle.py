"""`make bundle ARCH=arm64|amd64`: one signed directory (and tarball) with everything a device installs.

    appliance-<release>-<arch>-bundle/
      bundle.toml          release, appliance version, arch, the pip requirement to install
      wheels/*.whl         the appliance and every dependency, built or downloaded for the arch
      models/              the chosen model files, licence files and the catalog.toml describing them
      systemd/             the unit files (installed by the installer), mosquitto/ (broker config and ACL)
      bin/appliance-install-bundle   the installer, for devices to update their own trusted copy from
      MANIFEST             sha256 of every file above (``sha256sum`` format)
      MANIFEST.sig         OpenSSH signature of MANIFEST (``ssh-keygen -Y sign``, namespace appliance-bundle)

The image build and the fleet playbooks consume this same bundle; devices install it with
appliance/release (its zipapp in bin/), which refuses it unless the signature and every digest check out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import tomllib
import zipapp
from datetime import UTC, datetime
from pathlib import Path

import appliance.release
from appliance import __version__
from appliance.catalog import Catalog, default_model
from appliance.catalog.writer import dumps
from appliance.release.verify import FORMAT, NAMESPACE, PRINCIPAL, SIGNED, BundleError, sha256_file
from image import wheels as wheelhouse
from image.steps import REPO, BuildError, cache_dir, check_arch, run, say, step

EXTRAS = {"arm64": "llama,onnx,gpio", "amd64": "llama,onnx"}  # the twin has no GPIO to drive
DEFAULT_KEY = Path.home() / ".config" / "appliance" / "bundle-signing-key"
MODEL_FILE_KEYS = ("file", "lora", "tokenizer")


def write_manifest(bundle_dir: Path) -> Path:
    """MANIFEST in ``sha256sum`` format (so ``sha256sum --strict -c MANIFEST`` checks it too), sorted by path."""
    lines = []
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel in SIGNED or path.is_dir():
            continue
        if path.is_symlink() or not path.is_file():
            raise BuildError(f"{rel}: a bundle holds regular files only")
        lines.append(f"{sha256_file(path)}  {rel}\n")
    manifest = bundle_dir / "MANIFEST"
    manifest.write_text("".join(lines), encoding="utf-8")
    return manifest


def sign(bundle_dir: Path, private_key: Path) -> Path:
    signature = bundle_dir / "MANIFEST.sig"
    signature.unlink(missing_ok=True)
    run(["ssh-keygen", "-Y", "sign", "-q", "-f", str(private_key), "-n", NAMESPACE,
         str(bundle_dir / "MANIFEST")])
    return signature


def installer_zipapp(dest: Path) -> Path:
    """appliance/release as one executable file for Debian's python3 (stdlib only): what devices run."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(Path(appliance.release.__file__).parent, Path(tmp) / "release",
                        ignore=shutil.ignore_patterns("__pycache__"))
        # zipapp's own `main=` would drop main()'s return value, and with it the exit code callers rely on
        (Path(tmp) / "__main__.py").write_text("import sys\nfrom release.cli import main\nsys.exit(main())\n")
        zipapp.create_archive(tmp, dest, interpreter="/usr/bin/python3")
    return dest


def signing_key(path: Path) -> Path:
    """The ed25519 key bundles are signed with; made on first use. Its .pub goes into images as the trusted key."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-bundle", "-f", str(path)])
        say(f"created the bundle signing key {path} (keep it safe: devices trust only bundles it signed)")
    return path


def allowed_signers(key: Path) -> str:
    """The line for a device's ``/etc/appliance/bundle-signers`` that trusts this key, for bundles only."""
    public = Path(str(key) + ".pub").read_text().strip()
    return f'{PRINCIPAL} namespaces="{NAMESPACE}" {public}\n'


def appliance_wheel(version: str | None, into: Path) -> Path:
    """The appliance as a wheel, built from a copy of the tree (carrying ``version`` when given): pip builds a
    directory in place, in its build/ and *.egg-info, so two builds of the tree itself at once (a test's bundle and
    the image built beside the tests) could remove each other's files."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
            ".mypy_cache"))
        if version and version != __version__:
            init = source / "appliance" / "__init__.py"
            init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"'))
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(into),
             str(source)])
    found = sorted(into.glob(f"appliance-{version or __version__}-*.whl"))
    if not found:
        raise BuildError(f"no appliance wheel of version {version or __version__} was built")
    return found[-1]


def _default_catalog(cache: Path) -> tuple[list[dict], list[Path]]:
    """The embedded default model, copied from its installed PyPI package, and the Apache-2.0 text that travels
    with it (as ``<file>.LICENSE``)."""
    models = cache / "models"
    path = default_model.ensure(models)
    entry = {**default_model.catalog_table(), "file": str(path)}
    licence = models / f"{default_model.FILE_NAME}.LICENSE"
    shutil.copyfile(default_model.installed_file("LICENSE"), licence)
    return [entry], [licence]


def _catalog_models(catalog_path: Path) -> tuple[list[dict], list[Path]]:
    catalog = Catalog.load(catalog_path)  # validates the entries and resolves their paths
    raw = tomllib.loads(catalog_path.read_text())["models"]
    entries = []
    for table in raw:
        entry = catalog.get(table["id"])
        resolved = {"file": entry.path, "lora": entry.lora,
                    "tokenizer": Path(entry.tokenizer) if entry.tokenizer and entry.tokenizer != "world" else None}
        entries.append({**table, **{k: str(v) for k, v in resolved.items() if v is not None and k in table}})
    return entries, []


def add_models(entries: list[dict], extra_files: list[Path], models_dir: Path) -> list[str]:
    """Copy each entry's files (model, LoRA adapter, tokenizer) in by name and write a catalog that points there;
    every digest the catalog states is checked on the way, so a bad file never ships."""
    models_dir.mkdir(parents=True)
    written: dict[str, Path] = {}
    out = []
    for entry in entries:
        entry = dict(entry)
        for key in MODEL_FILE_KEYS:
            if key not in entry:
                continue
            source = Path(entry[key])
            if source.name in written and written[source.name] != source:
                raise BuildError(f"two different files are named {source.name}: {written[source.name]}, {source}")
            if source.name not in written:
                shutil.copyfile(source, models_dir / source.name)
                written[source.name] = source
            entry[key] = source.name
            expected = entry.get("sha256" if key == "file" else f"{key}_sha256")
            if expected and sha256_file(models_dir / source.name) != expected:
                raise BuildError(f"{source}: its sha256 is not the catalog's {expected}")
        if "sha256" not in entry:
            entry["sha256"] = sha256_file(models_dir / entry["file"])
        out.append(entry)
    for extra in extra_files:
        shutil.copyfile(extra, models_dir / extra.name)
    (models_dir / "catalog.toml").write_text(dumps(out), encoding="utf-8")
    Catalog.load(models_dir / "catalog.toml")  # what devices will read must parse
    return [e["id"] for e in out]


def build(arch: str, out: Path, *, catalog: Path | None = None, key: Path = DEFAULT_KEY, extras: str | None = None,
          version: str | None = None, release: str | None = None, tarball: bool = True) -> Path:
    check_arch(arch)
    cache = cache_dir()
    wheels = cache / "wheels" / arch
    wheels.mkdir(parents=True, exist_ok=True)
    version = version or __version__
    release = release or version
    extras = EXTRAS[arch] if extras is None else extras
    target = out / f"appliance-{release}-{arch}-bundle"
    with step(f"bundle {target.name}"):
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as local:
            local = Path(local)
            appliance_wheel(version, local)
            if "llama" in extras.split(","):
                wheelhouse.llama_wheel(arch, wheels)
            if arch == "arm64" and "gpio" in extras.split(","):
                from image.rootfs import build_sdist_wheel
                build_sdist_wheel(arch, wheelhouse.requirement_of("lgpio"), wheels)
            requirement = f"appliance[{extras}]=={version}" if extras else f"appliance=={version}"
            wheelhouse.collect(arch, requirement, local, wheels, target / "wheels")
        with step("models"):
            entries, extra_files = _catalog_models(catalog) if catalog else _default_catalog(cache)
            model_ids = add_models(entries, extra_files, target / "models")
        for unit in sorted((REPO / "systemd").glob("*.service")):
            (target / "systemd").mkdir(exist_ok=True)
            shutil.copyfile(unit, target / "systemd" / unit.name)
        shutil.copytree(REPO / "systemd" / "mosquitto", target / "mosquitto")
        (target / "bin").mkdir()
        installer_zipapp(target / "bin" / "appliance-install-bundle")
        (target / "bundle.toml").write_text(
            f'format = {FORMAT}\nrelease = "{release}"\nversion = "{version}"\narch = "{arch}"\n'
            f'requirement = "{requirement}"\npython = "{wheelhouse.PYTHON_VERSION}"\n'
            f'models = [{", ".join(repr(m).replace(chr(39), chr(34)) for m in model_ids)}]\n'
            f'created = "{datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}"\n')
        write_manifest(target)
        sign(target, signing_key(key))
        if tarball:
            with tarfile.open(target.with_suffix(".tar"), "w") as tar:  # models and wheels do not compress
                tar.add(target, arcname=target.name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    say(f"bundle: {target} ({size / 2**20:.0f} MiB; models: {', '.join(model_ids)})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--catalog", type=Path, help="a catalog whose models go in (default: the embedded model)")
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY, help="signing key (ed25519, made when missing)")
    parser.add_argument("--extras", help=f"pip extras to install (default per arch: {EXTRAS})")
    parser.add_argument("--version", help="build the appliance with this version (e.g. a fleet test's new release)")
    parser.add_argument("--release", help="release name on the device (default: the version)")
    parser.add_argument("--no-tarball", action="store_true")
    args = parser.parse_args(argv)
    try:
        build(args.arch, args.out, catalog=args.catalog, key=args.key, extras=args.extras, version=args.version,
              release=args.release, tarball=not args.no_tarball)
    except (BuildError, BundleError) as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
