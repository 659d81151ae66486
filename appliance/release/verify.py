"""Checking an offline bundle before anything of it is used: the signature over its MANIFEST, every file's sha256,
nothing unlisted, and its metadata (docs/image.md has the format).

Standard library only, like the rest of appliance/release: the device runs this package as
``/usr/local/sbin/appliance-install-bundle`` (a zipapp of it, shipped in every bundle's bin/) before, and
independently of, the appliance it installs.
"""

from __future__ import annotations

import hashlib
import platform
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

NAMESPACE = "appliance-bundle"  # ssh-keygen -Y namespace: a signature made for anything else does not verify
PRINCIPAL = "appliance-bundle"  # the identity in the allowed-signers file
FORMAT = 1
SIGNED = ("MANIFEST", "MANIFEST.sig")
ARCH_OF_MACHINE = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_LINE = re.compile(r"([0-9a-f]{64})  (\S(?:.*\S)?)")
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
CHUNK = 1 << 20
STAMP = ".complete"  # in a release's directory: the sha256 of the MANIFEST it was installed from, written last


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
    # files checked for presence only, not against their digest: the software of a release already installed from
    # this MANIFEST, which installing it again does not read (``check_unread`` checks them if it must after all)
    unread: frozenset[str] = frozenset()

    def files_under(self, folder: str) -> list[str]:
        return sorted(p for p in self.digests if p.startswith(folder + "/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(bundle_dir: Path, signers: Path, arch: str | None = None, store: Path | None = None,
           releases: Path | None = None) -> Bundle:
    """The bundle, once its signature, every digest and its metadata check out; else BundleError.

    With ``store`` (the device's model store), a model file may be left out of the bundle directory when the store
    already holds it, checked by digest: the fleet playbooks send only the models a device lacks.

    With ``releases`` (the device's releases directory), the software of a release already installed from this very
    MANIFEST (its stamp names the MANIFEST's sha256) is checked for presence only: each of those files was checked
    against its digest when that release was installed, and installing it again reads none of them (every run of the
    fleet's playbooks would otherwise hash 80 MB twice on every device). bundle.toml, the catalog and the model
    files, which an install reads, are checked as always."""
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
    digests = parse_manifest(manifest)
    manifest_sha256 = sha256_file(manifest)
    _check_digests(bundle_dir, {"bundle.toml": digests["bundle.toml"]})  # first: it names the release
    meta = _metadata(bundle_dir)
    unread: frozenset[str] = frozenset()
    if releases is not None and installed_from(releases / meta["release"]) == manifest_sha256:
        unread = frozenset(rel for rel in digests if rel != "bundle.toml" and not rel.startswith("models/"))
    stored = _check_files(bundle_dir, digests, store, not_hashed=unread | {"bundle.toml"})  # bundle.toml: above
    wanted = arch or machine_arch()
    if meta["arch"] != wanted:
        raise BundleError(f"bundle.toml: arch = {meta['arch']!r}, but this device is {wanted}")
    return Bundle(path=bundle_dir, release=meta["release"], version=meta["version"], arch=meta["arch"],
                  requirement=meta["requirement"], digests=digests, manifest_sha256=manifest_sha256,
                  stored=stored, unread=unread)


def installed_from(release_dir: Path) -> str | None:
    """The sha256 of the MANIFEST an installed release came from (its stamp), or None: not (completely) installed."""
    stamp = release_dir / STAMP
    return stamp.read_text().strip() if stamp.is_file() else None


def check_unread(bundle: Bundle) -> None:
    """Check the files ``verify`` left unread against their digest (an install that must read them after all: the
    release it found installed is gone); BundleError names the first that does not match."""
    _check_digests(bundle.path, {rel: bundle.digests[rel] for rel in bundle.unread})


def machine_arch() -> str:
    return ARCH_OF_MACHINE.get(platform.machine(), platform.machine())


def parse_manifest(manifest: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        match = _LINE.fullmatch(line)
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


def _check_files(bundle_dir: Path, digests: dict[str, str], store: Path | None,
                 not_hashed: frozenset[str] = frozenset()) -> frozenset[str]:
    """Every listed file present (a model may be in the store instead: those are returned) and nothing unlisted;
    each checked against its digest but those in ``not_hashed``."""
    present = set()
    for path in bundle_dir.rglob("*"):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise BundleError(f"{rel}: a symbolic link in the bundle")
        if path.is_file() and rel not in SIGNED:
            present.add(rel)
    if unlisted := sorted(present - digests.keys()):
        raise BundleError(f"{unlisted[0]}: in the bundle but not in MANIFEST ({len(unlisted)} such files)")
    from .store import ModelStore  # (store imports this module)
    held = ModelStore.open_existing(store) if store and digests.keys() - present else None
    try:
        stored: set[str] = set()
        for rel in sorted(digests.keys() - present):
            if held is None or not is_model(rel) or not held.holds(store_name(rel, digests[rel])):
                raise BundleError(f"{rel}: listed in MANIFEST but missing"
                                  + (" (and not in the device's model store)" if store and is_model(rel) else ""))
            stored.add(rel)
        if held is not None:
            for rel in sorted(stored):
                # the store's copy is read without following links: root reads nothing the service could point it at
                _match(rel, held.sha256(store_name(rel, digests[rel])), digests[rel])
        _check_digests(bundle_dir, {rel: digests[rel] for rel in digests.keys() - stored - not_hashed})
    finally:
        if held is not None:
            held.close()
    return frozenset(stored)


def _check_digests(bundle_dir: Path, digests: dict[str, str]) -> None:
    for rel, expected in sorted(digests.items()):
        path = bundle_dir / rel
        if path.is_symlink():
            raise BundleError(f"{rel}: a symbolic link in the bundle")
        if not path.is_file():
            raise BundleError(f"{rel}: listed in MANIFEST but missing")
        _match(rel, sha256_file(path), expected)


def _match(rel: str, actual: str | None, expected: str) -> None:
    if actual != expected:
        raise BundleError(f"{rel}: sha256 {actual} does not match MANIFEST's {expected}")


def is_model(rel: str) -> bool:
    return rel.startswith("models/") and rel != "models/catalog.toml"


def _metadata(bundle_dir: Path) -> dict[str, Any]:
    try:
        meta = tomllib.loads((bundle_dir / "bundle.toml").read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle.toml: not valid TOML: {exc}") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"bundle.toml: format = {meta.get('format')!r}; this installer reads format {FORMAT}")
    for key in ("release", "version", "arch", "requirement"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise BundleError(f"bundle.toml: {key} missing or not a string")
    if not _RELEASE.fullmatch(meta["release"]):
        raise BundleError(f"bundle.toml: release = {meta['release']!r} is not a safe directory name")
    return meta


def store_name(rel: str, digest: str) -> str:
    """A model file's name in the device's store: the start of its digest, then its own name."""
    return f"{digest[:16]}-{PurePosixPath(rel).name}"


def _ssh_keygen(args: list[str], stdin: IO[bytes] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ssh-keygen", *args], stdin=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BundleError("ssh-keygen not found (package openssh-client); it checks bundle signatures") from None
    if check and result.returncode != 0:
        raise BundleError(f"ssh-keygen {args[0]} {args[1]} failed: {result.stderr.strip()}")
    return result


