#!/usr/bin/python3
"""Verify an offline bundle, then install it as a release: the one way software and models reach a device.

Standard library only, one file: the image carries it as ``/usr/local/sbin/appliance-install-bundle`` and the fleet
playbooks run that copy, so it works before, and independently of, the appliance it installs. Nothing is written
until the whole bundle is verified: the signature over ``MANIFEST`` (OpenSSH ``ssh-keygen -Y verify`` against the
device's allowed signers), then the sha256 of every file MANIFEST lists, and that it lists every file there is.

On the device::

    /opt/appliance/releases/<release>/   venv/, systemd/, bundle.toml, MANIFEST, .complete, and
                                         models/catalog.toml with a link per model file into the store:
    /var/lib/appliance/models/<sha256 prefix>-<name>   model files, shared by the releases that ship them
    /opt/appliance/current  -> releases/<release>    switched atomically (rename of a new link)
    /opt/appliance/previous -> releases/<older>      what `rollback` goes back to, catalog included

A release carries its own catalog, so going back to the previous release also goes back to its models; files
are stored under their digest, so installing a new release never changes a file the running one reads. Releases
other than current and previous, and store files no kept release links to, are removed after a switch.

Exit codes: 0 done (the JSON line on stdout says whether anything changed), 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NAMESPACE = "appliance-bundle"  # ssh-keygen -Y namespace: a signature made for anything else does not verify
PRINCIPAL = "appliance-bundle"  # the identity in the allowed-signers file
FORMAT = 1
SIGNED = ("MANIFEST", "MANIFEST.sig")
ARCH_OF_MACHINE = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_LINE = re.compile(r"^([0-9a-f]{64})  (\S(?:.*\S)?)$")
_RELEASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
CHUNK = 1 << 20


class BundleError(Exception):
    """The bundle is refused, or installing it failed; the message says which file and why."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    release: str
    version: str
    arch: str
    requirement: str
    digests: dict[str, str]  # relative path -> sha256, as MANIFEST lists them
    manifest_sha256: str
    stored: frozenset[str] = frozenset()  # model files not sent because the device's store holds them

    def files_under(self, folder: str) -> list[str]:
        return sorted(p for p in self.digests if p.startswith(folder + "/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- verifying --------------------------------------------------------------------------------------------------

def verify(bundle_dir: Path, signers: Path, arch: str | None = None, store: Path | None = None) -> Bundle:
    """The bundle, once its signature, every digest and its metadata check out; else BundleError.

    With ``store`` (the device's model store), a model file may be left out of the bundle directory when the store
    already holds it, checked by digest: the fleet playbooks send only the models a device lacks."""
    bundle_dir = Path(bundle_dir)
    for name in SIGNED:
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir}: no {name}; not a signed bundle")
    if not signers.is_file():
        raise BundleError(f"{signers}: no allowed-signers file, so no bundle can be trusted")
    manifest = bundle_dir / "MANIFEST"
    with manifest.open("rb") as stdin:
        result = _ssh_keygen(["-Y", "verify", "-f", str(signers), "-I", PRINCIPAL, "-n", NAMESPACE,
                              "-s", str(bundle_dir / "MANIFEST.sig")], stdin=stdin, check=False)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise BundleError(f"{manifest}: the signature does not verify against {signers}"
                          f"{': ' + why[-1] if why else ''}")
    digests = _parse_manifest(manifest)
    stored = _check_files(bundle_dir, digests, store)
    meta = _metadata(bundle_dir)
    wanted = arch or machine_arch()
    if meta["arch"] != wanted:
        raise BundleError(f"bundle.toml: arch = {meta['arch']!r}, but this device is {wanted}")
    return Bundle(path=bundle_dir, release=meta["release"], version=meta["version"], arch=meta["arch"],
                  requirement=meta["requirement"], digests=digests, manifest_sha256=sha256_file(manifest),
                  stored=stored)


def machine_arch() -> str:
    return ARCH_OF_MACHINE.get(platform.machine(), platform.machine())


def _parse_manifest(manifest: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        match = _LINE.match(line)
        if not match:
            raise BundleError(f"MANIFEST line {number}: not '<sha256>  <path>'")
        digest, rel = match.groups()
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel in SIGNED or str(pure) != rel:
            raise BundleError(f"MANIFEST line {number}: unsafe path {rel!r}")
        if rel in digests:
            raise BundleError(f"MANIFEST line {number}: {rel} listed twice")
        digests[rel] = digest
    if "bundle.toml" not in digests:
        raise BundleError("MANIFEST does not list bundle.toml")
    return digests


def _check_files(bundle_dir: Path, digests: dict[str, str], store: Path | None) -> frozenset[str]:
    present = set()
    for path in bundle_dir.rglob("*"):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise BundleError(f"{rel}: a symbolic link in the bundle")
        if path.is_file() and rel not in SIGNED:
            present.add(rel)
    if unlisted := sorted(present - digests.keys()):
        raise BundleError(f"{unlisted[0]}: in the bundle but not in MANIFEST ({len(unlisted)} such files)")
    stored = set()
    for rel in sorted(digests.keys() - present):
        held = store / store_name(rel, digests[rel]) if store and _is_model(rel) else None
        if held is None or not held.is_file():
            raise BundleError(f"{rel}: listed in MANIFEST but missing"
                              + (" (and not in the device's model store)" if store and _is_model(rel) else ""))
        stored.add(rel)
    for rel, expected in sorted(digests.items()):
        actual = sha256_file(store / store_name(rel, expected) if rel in stored else bundle_dir / rel)
        if actual != expected:
            raise BundleError(f"{rel}: sha256 {actual} does not match MANIFEST's {expected}")
    return frozenset(stored)


def _is_model(rel: str) -> bool:
    return rel.startswith("models/") and rel != "models/catalog.toml"


def _metadata(bundle_dir: Path) -> dict:
    try:
        meta = tomllib.loads((bundle_dir / "bundle.toml").read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle.toml: not valid TOML: {exc}") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"bundle.toml: format = {meta.get('format')!r}; this installer reads format {FORMAT}")
    for key in ("release", "version", "arch", "requirement"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise BundleError(f"bundle.toml: {key} missing or not a string")
    if not _RELEASE.match(meta["release"]):
        raise BundleError(f"bundle.toml: release = {meta['release']!r} is not a safe directory name")
    return meta


# -- installing -------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    prefix: Path = Path("/opt/appliance")
    state_dir: Path = Path("/var/lib/appliance")
    units_dir: Path | None = Path("/etc/systemd/system")
    python: str = "/usr/bin/python3"

    def release(self, name: str) -> Path:
        return self.prefix / "releases" / name

    @property
    def models(self) -> Path:
        return self.state_dir / "models"


def install(bundle: Bundle, layout: Layout, activate: bool = True, log=print) -> dict:
    """Install a verified bundle; returns what changed (for Ansible's ``changed_when`` and for people)."""
    changes = {"release": bundle.release, "version": bundle.version, "installed": False, "models": [],
               "units": [], "activated": False, "previous": current_release(layout)}
    target = layout.release(bundle.release)
    stamp = target / ".complete"
    if not (stamp.is_file() and stamp.read_text().strip() == bundle.manifest_sha256):
        _install_release(bundle, target, layout, log)
        stamp.write_text(bundle.manifest_sha256 + "\n")
        changes["installed"] = True
    changes["models"] = _install_models(bundle, target, layout, log)
    if activate:
        changes["units"] = _install_units(target, layout)
        changes["activated"] = switch(layout, bundle.release)
        if changes["activated"]:
            changes["removed"] = prune(layout)
    changes["changed"] = bool(changes["installed"] or changes["models"] or changes["units"] or changes["activated"])
    return changes


def _install_release(bundle: Bundle, target: Path, layout: Layout, log) -> None:
    if target.exists():
        if current_release(layout) == bundle.release:
            raise BundleError(f"{target} is the running release but differs from this bundle; install the bundle "
                              f"under another release name")
        shutil.rmtree(target)  # an unfinished or different install of this name
    target.mkdir(parents=True)
    log(f"creating {target}/venv")
    _run([layout.python, "-m", "venv", str(target / "venv")])
    log(f"installing {bundle.requirement} from the bundle's wheels (no index)")
    _run([str(target / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
          "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(bundle.path / "wheels"),
          bundle.requirement])
    for rel in ("bundle.toml", "MANIFEST", *bundle.files_under("systemd"), *bundle.files_under("bin")):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.path / rel, dest)


def store_name(rel: str, digest: str) -> str:
    return f"{digest[:16]}-{PurePosixPath(rel).name}"


def _install_models(bundle: Bundle, release_dir: Path, layout: Layout, log) -> list[str]:
    """Copy the model files the store lacks (checked against their digest after the copy), then give the release
    its catalog and a link per file; returns the store files written."""
    written = []
    links = release_dir / "models"
    links.mkdir(parents=True, exist_ok=True)
    for rel in bundle.files_under("models"):
        name = rel[len("models/"):]
        if name == "catalog.toml":
            shutil.copyfile(bundle.path / rel, links / name)
            continue
        stored = layout.models / store_name(rel, bundle.digests[rel])
        if rel not in bundle.stored and not (stored.is_file()
                                              and stored.stat().st_size == (bundle.path / rel).stat().st_size):
            log(f"copying {rel}")
            stored.parent.mkdir(parents=True, exist_ok=True)
            partial = stored.with_name(stored.name + ".partial")
            shutil.copyfile(bundle.path / rel, partial)
            if sha256_file(partial) != bundle.digests[rel]:  # a bad SD card or a full disk shows here
                partial.unlink()
                raise BundleError(f"{stored}: the copy does not match the bundle's sha256")
            partial.chmod(0o644)
            partial.replace(stored)
            written.append(str(stored))
        link = links / name
        if not (link.is_symlink() and Path(os.readlink(link)) == stored):
            link.unlink(missing_ok=True)
            link.symlink_to(stored)
    return written


def prune(layout: Layout) -> list[str]:
    """Remove releases other than current and previous, then store files no kept release links to."""
    keep = {current_release(layout), current_release(layout, "previous")} - {None}
    removed = []
    root = layout.prefix / "releases"
    for release in sorted(root.iterdir()) if root.is_dir() else []:
        if release.name not in keep:
            shutil.rmtree(release)
            removed.append(str(release))
    linked = {Path(os.readlink(link)) for name in keep
              for link in (layout.release(name) / "models").glob("*") if link.is_symlink()}
    for stored in sorted(layout.models.glob("*")) if layout.models.is_dir() else []:
        if stored.is_file() and stored not in linked and not stored.name.endswith(".partial"):
            stored.unlink()
            removed.append(str(stored))
    return removed


def _install_units(release_dir: Path, layout: Layout) -> list[str]:
    if layout.units_dir is None or not (release_dir / "systemd").is_dir():
        return []
    changed = []
    for unit in sorted((release_dir / "systemd").glob("*.service")):
        dest = layout.units_dir / unit.name
        if not dest.is_file() or dest.read_bytes() != unit.read_bytes():
            layout.units_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(unit, dest)
            changed.append(str(dest))
    return changed


def current_release(layout: Layout, link: str = "current") -> str | None:
    path = layout.prefix / link
    return Path(os.readlink(path)).name if path.is_symlink() else None


def _point(layout: Layout, link: str, release: str) -> None:
    new = layout.prefix / f".{link}.new"
    new.unlink(missing_ok=True)
    new.symlink_to(Path("releases") / release)
    new.replace(layout.prefix / link)  # rename(2): the link is never missing, even on a power cut


def switch(layout: Layout, release: str) -> bool:
    """Make ``release`` current, remembering the one it replaces as previous; False when it already was."""
    if not (layout.release(release) / ".complete").is_file():
        raise BundleError(f"release {release} is not (completely) installed under {layout.prefix}/releases")
    old = current_release(layout)
    if old == release:
        return False
    if old is not None:
        _point(layout, "previous", old)
    _point(layout, "current", release)
    return True


def rollback(layout: Layout) -> dict:
    previous = current_release(layout, "previous")
    if previous is None:
        raise BundleError(f"{layout.prefix}/previous: no previous release to go back to")
    failed = current_release(layout)
    switch(layout, previous)
    units = _install_units(layout.release(previous), layout)
    return {"changed": True, "release": previous, "rolled_back_from": failed, "units": units}


def releases(layout: Layout) -> dict:
    root = layout.prefix / "releases"
    names = sorted(p.name for p in root.iterdir() if (p / ".complete").is_file()) if root.is_dir() else []
    return {"current": current_release(layout), "previous": current_release(layout, "previous"), "releases": names,
            "changed": False}


# -- plumbing ---------------------------------------------------------------------------------------------------

def _ssh_keygen(args: list[str], stdin=None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(["ssh-keygen", *args], stdin=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BundleError("ssh-keygen not found (package openssh-client); it checks bundle signatures") from None
    if check and result.returncode != 0:
        raise BundleError(f"ssh-keygen {args[0]} {args[1]} failed: {result.stderr.strip()}")
    return result


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"{' '.join(command[:4])} ... failed (exit {result.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-install-bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--signers", type=Path, default=Path("/etc/appliance/bundle-signers"),
                        help="allowed-signers file of the keys trusted to sign bundles")
    parser.add_argument("--prefix", type=Path, default=Layout.prefix)
    parser.add_argument("--state-dir", type=Path, default=Layout.state_dir)
    parser.add_argument("--units-dir", default=str(Layout.units_dir), help="where unit files go; '' for nowhere")
    parser.add_argument("--arch", help="the device's architecture (default: this machine's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("verify", "check a bundle, install nothing"), ("install", "verify, install, activate")):
        p = sub.add_parser(name, help=text)
        p.add_argument("bundle", type=Path)
    sub.choices["install"].add_argument("--no-activate", action="store_true", help="install but keep `current`")
    sub.add_parser("rollback", help="make the previous release current again")
    sub.add_parser("list", help="installed releases, current and previous")
    args = parser.parse_args(argv)
    layout = Layout(prefix=args.prefix, state_dir=args.state_dir, units_dir=Path(args.units_dir) if args.units_dir
                    else None)
    try:
        if args.command in ("verify", "install"):
            bundle = verify(args.bundle, args.signers, args.arch, store=layout.models)
            if args.command == "verify":
                result = {"changed": False, "release": bundle.release, "version": bundle.version, "verified": True}
            else:
                result = install(bundle, layout, activate=not args.no_activate,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
        elif args.command == "rollback":
            result = rollback(layout)
        else:
            result = releases(layout)
    except (BundleError, OSError) as exc:
        print(f"appliance-install-bundle: refused: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
