"""Installing a verified bundle as a release beside the running one, switching to it, rolling back, pruning.

    /opt/appliance/releases/<release>/   venv/, systemd/, bin/, bundle.toml, MANIFEST, .complete, and
                                         models/catalog.toml with a link per model file into the store:
    /var/lib/appliance/models/<sha256 prefix>-<name>   model files, shared by the releases that ship them
    /opt/appliance/current  -> releases/<release>    switched atomically (rename of a new link)
    /opt/appliance/previous -> releases/<older>      what `rollback` goes back to, catalog included

A release carries its own catalog, so going back to the previous release also goes back to its models; files
are stored under their digest, so installing a new release never changes a file the running one reads. Releases
other than current and previous, and store files no kept release links to, are removed after a switch.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .verify import Bundle, BundleError, is_model, parse_manifest, sha256_file, store_name


@dataclass
class Layout:
    prefix: Path = Path("/opt/appliance")
    state_dir: Path = Path("/var/lib/appliance")
    units_dir: Path | None = Path("/etc/systemd/system")
    python: str = "/usr/bin/python3"
    tool: Path | None = Path("/usr/local/sbin/appliance-install-bundle")  # this installer, as the device runs it

    def release(self, name: str) -> Path:
        return self.prefix / "releases" / name

    @property
    def models(self) -> Path:
        return self.state_dir / "models"


def install(bundle: Bundle, layout: Layout, activate: bool = True, discard_models: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Install a verified bundle; returns what changed (for Ansible's ``changed_when`` and for people). With
    ``discard_models`` the bundle's model files are deleted once the store holds them (a staging copy)."""
    changes: dict[str, Any] = {"release": bundle.release, "version": bundle.version, "installed": False, "models": [],
               "units": [], "activated": False, "running": current_release(layout)}
    target = layout.release(bundle.release)
    stamp = target / ".complete"
    if not (stamp.is_file() and stamp.read_text().strip() == bundle.manifest_sha256):
        _install_release(bundle, target, layout, log)
        stamp.write_text(bundle.manifest_sha256 + "\n")
        changes["installed"] = True
    changes["models"] = _install_models(bundle, target, layout, log)
    if discard_models:
        staged = [bundle.path / rel for rel in bundle.files_under("models") if is_model(rel)]
        changes["discarded"] = [str(p) for p in staged if p.is_file()]
        for path in changes["discarded"]:
            Path(path).unlink()
    if activate:
        changes["units"] = _install_units(target, layout)
        changes["activated"] = switch(layout, bundle.release)
        if changes["activated"]:
            changes["removed"] = prune(layout)
    changes["changed"] = any(changes.get(k) for k in ("installed", "models", "discarded", "units", "activated"))
    return changes


def _install_release(bundle: Bundle, target: Path, layout: Layout, log: Callable[[str], None]) -> None:
    if target.exists():
        if current_release(layout) == bundle.release:
            raise BundleError(f"{target} is the running release but differs from this bundle; install the bundle "
                              f"under another release name")
        shutil.rmtree(target)  # an unfinished or different install of this name
    target.mkdir(parents=True)
    pip = [str(target / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    wheels = _wheel_digests(bundle.digests)
    base = layout.release(current_release(layout) or "-")
    old = _wheel_digests(parse_manifest(base / "MANIFEST")) if _reusable(base) else None
    if old is not None:
        # a copy of the running release's venv, with only the wheels that differ (by digest) put in: an update
        # that changes the appliance alone takes seconds instead of minutes of unpacking and compiling on a card
        changed = sorted(name for name, digest in wheels.items() if old.get(name) != digest)
        log(f"copying the venv of release {base.name}; installing the {len(changed)} wheels that differ")
        _run(["cp", "-a", str(base / "venv"), str(target / "venv")])
        _retarget(target / "venv" / "bin", str(base / "venv"), str(target / "venv"))
        if gone := sorted({_dist(n) for n in old} - {_dist(n) for n in wheels}):
            _run([*pip, "uninstall", "--yes", "--quiet", *gone])
        if changed:
            _run([*pip, "install", "--quiet", "--no-index", "--no-deps", "--force-reinstall",
                  *(str(bundle.path / "wheels" / name) for name in changed)])
        _run([*pip, "check"])
    else:
        log(f"creating {target}/venv; installing {bundle.requirement} from the bundle's wheels (no index)")
        _run([layout.python, "-m", "venv", str(target / "venv")])
        _run([*pip, "install", "--quiet", "--no-index", "--find-links", str(bundle.path / "wheels"),
              bundle.requirement])
    for rel in ("bundle.toml", "MANIFEST", *bundle.files_under("systemd"), *bundle.files_under("bin")):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.path / rel, dest)


def _reusable(release_dir: Path) -> bool:
    """Whether a release's venv can be the start of the next: complete, and made by this same Python (a venv
    names its interpreter's minor version in its paths)."""
    cfg = release_dir / "venv" / "pyvenv.cfg"
    if not ((release_dir / ".complete").is_file() and cfg.is_file()):
        return False
    version = next((line.split("=", 1)[1].strip() for line in cfg.read_text().splitlines()
                    if line.split("=", 1)[0].strip() == "version"), "")
    return version.split(".")[:2] == list(platform.python_version_tuple()[:2])


def _wheel_digests(digests: dict[str, str]) -> dict[str, str]:
    """The wheel files among a MANIFEST's entries, by file name, with their digests."""
    return {PurePosixPath(rel).name: digest for rel, digest in digests.items() if rel.startswith("wheels/")}


def _dist(wheel_name: str) -> str:
    return wheel_name.split("-")[0].lower()


def _retarget(bin_dir: Path, old: str, new: str) -> None:
    """A copied venv's scripts name the interpreter of the venv they were copied from: point them at the copy."""
    for script in bin_dir.iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if old.encode() in data[:4096]:
                script.write_bytes(data.replace(old.encode(), new.encode()))


def _install_models(bundle: Bundle, release_dir: Path, layout: Layout,
                    log: Callable[[str], None]) -> list[str]:
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
    keep = {name for name in (current_release(layout), current_release(layout, "previous")) if name is not None}
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
    """The release's unit files, and its installer as the device's own (it was just verified with the rest):
    the files that changed."""
    pairs = [(unit, layout.units_dir / unit.name) for unit in sorted((release_dir / "systemd").glob("*.service"))
             if layout.units_dir is not None]
    if layout.tool is not None and (release_dir / "bin/appliance-install-bundle").is_file():
        pairs.append((release_dir / "bin/appliance-install-bundle", layout.tool))
    changed = []
    for source, dest in pairs:
        if not dest.is_file() or dest.read_bytes() != source.read_bytes():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            dest.chmod(0o755 if dest == layout.tool else 0o644)
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


def rollback(layout: Layout) -> dict[str, Any]:
    previous = current_release(layout, "previous")
    if previous is None:
        raise BundleError(f"{layout.prefix}/previous: no previous release to go back to")
    failed = current_release(layout)
    switch(layout, previous)
    units = _install_units(layout.release(previous), layout)
    return {"changed": True, "release": previous, "rolled_back_from": failed, "units": units}


def releases(layout: Layout) -> dict[str, Any]:
    root = layout.prefix / "releases"
    names = sorted(p.name for p in root.iterdir() if (p / ".complete").is_file()) if root.is_dir() else []
    return {"current": current_release(layout), "previous": current_release(layout, "previous"), "releases": names,
            "changed": False}


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"{' '.join(command[:4])} ... failed (exit {result.returncode}):\n{tail}")


