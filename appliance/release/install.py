"""Installing a verified bundle as a release beside the running one, switching to it, rolling back, pruning.

    /opt/appliance/releases/<release>/   venv/, systemd/, bin/, bundle.toml, MANIFEST, .complete, and
                                         models/catalog.toml with a link per model file into the store:
    /var/lib/appliance/models/<sha256 prefix>-<name>   model files, shared by the releases that ship them
    /opt/appliance/current  -> releases/<release>    switched atomically (rename of a new link)
    /opt/appliance/previous -> releases/<older>      what `rollback` goes back to, catalog included
    /opt/appliance/trial.json, rolled-back.json      boot counting for a newly switched release (trial.py)

A release carries its own catalog, so going back to the previous release also goes back to its models; files
are stored under their digest, so installing a new release never changes a file the running one reads. Releases
other than current and previous, and store files no kept release links to, are removed after a switch.

A power cut at any moment leaves the old release current or the new one, never a mix: the release tree is written,
flushed as a whole (syncfs), and only then stamped ``.complete`` (written, fsynced, renamed, directory fsynced);
model files are copied in under a temporary name, fsynced, checked against their digest and renamed; a release
without its stamp is never switched to; ``current`` moves with one rename, its directory fsynced after. Every
command that changes something holds ``<prefix>/.lock``, so the service's start-up (trial counting), an operator and
Ansible never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import trial as trials
from .safefs import Directory, flush_filesystem, write_file
from .store import ModelStore
from .verify import STAMP, Bundle, BundleError, check_unread, installed_from, is_model, parse_manifest, store_name
from .versions import is_older


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


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """One changer at a time (released by the kernel when the process dies, power cut or not)."""
    with Directory(layout.prefix, create=True) as prefix:
        fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=prefix.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def install(bundle: Bundle, layout: Layout, activate: bool = True, discard_models: bool = False,
            allow_downgrade: bool = False, trial: tuple[int, float] = (trials.MAX_STARTS, trials.READY_WITHIN_S),
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Install a verified bundle; returns what changed (for Ansible's ``changed_when`` and for people). With
    ``discard_models`` the bundle's model files are deleted once the store holds them (a staging copy). A
    switch starts the release's ``trial`` (starts it gets to reach ready, seconds each may take; 0 starts: none)."""
    # the store first: one the service's account tampered with is refused before minutes of work
    with locked(layout), ModelStore(layout.models, create=True) as store:
        changes: dict[str, Any] = {"release": bundle.release, "version": bundle.version, "installed": False,
                                   "models": [], "units": [], "activated": False, "running": current_release(layout)}
        if not allow_downgrade:
            refuse_downgrade(bundle, layout)
        target = layout.release(bundle.release)
        stamped = installed_from(target) == bundle.manifest_sha256
        if not stamped:
            check_unread(bundle)  # verified against a release that is no longer there: read now, so check now
            # room first: releases nothing names any more, and what an interrupted install or prune left (a power
            # cut seconds after a switch stops the prune that follows it; a few such releases fill a card)
            changes["removed"] = prune(layout, also_keep=bundle.release,
                                       keep_files={store_name(rel, bundle.digests[rel]) for rel in bundle.stored})
            _install_release(bundle, target, layout, log)
        changes["models"] = _install_models(bundle, target, store, layout, log)
        if not stamped:
            flush_filesystem(target)  # every file pip and cp wrote, before the stamp that vouches for them
            with Directory(target) as d:
                d.write(STAMP, bundle.manifest_sha256 + "\n")
            changes["installed"] = True
        if discard_models:
            staged = [bundle.path / rel for rel in bundle.files_under("models") if is_model(rel)]
            changes["discarded"] = [str(p) for p in staged if p.is_file() and not p.is_symlink()]
            for path in changes["discarded"]:
                Path(path).unlink()
        if activate:
            changes["units"] = _install_units(target, layout)
            changes["activated"] = switch(layout, bundle.release, trial=trial)
            if changes["activated"]:
                log(f"switched current to {bundle.release}")
                changes["removed"] = changes.get("removed", []) + prune(layout)
    changes["changed"] = any(changes.get(k) for k in ("installed", "models", "discarded", "units", "activated"))
    return changes


def release_version(layout: Layout, release: str) -> str:
    import tomllib
    path = layout.release(release) / "bundle.toml"
    try:
        return str(tomllib.loads(path.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: cannot read the installed release's version ({exc}); pass --allow-downgrade "
                          f"to install without comparing") from None


def refuse_downgrade(bundle: Bundle, layout: Layout) -> None:
    """An older bundle, however well signed, could bring back a fixed hole: only with --allow-downgrade."""
    running = current_release(layout)
    if running is None:
        return
    installed = release_version(layout, running)
    if is_older(bundle.version, installed):
        raise BundleError(f"bundle {bundle.release} is version {bundle.version}, older than the running release "
                          f"{running} ({installed}): a downgrade. Pass --allow-downgrade to install it anyway; "
                          f"`rollback` goes back to the kept previous release without a bundle")


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
        # the running release's venv, hard-linked file by file, with only the wheels that differ (by digest) put
        # in: an update that changes the appliance alone takes seconds instead of minutes of unpacking and
        # compiling on a card, and the two releases share ~300 MB of unchanged files. Nothing writes a venv's file
        # in place: pip unlinks a file before it writes it, Python replaces a .pyc by rename, _retarget too.
        changed = sorted(name for name, digest in wheels.items() if old.get(name) != digest)
        log(f"linking the venv of release {base.name}; installing the {len(changed)} wheels that differ")
        _run(["cp", "-a", "--link", str(base / "venv"), str(target / "venv")])
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
    if not ((release_dir / STAMP).is_file() and cfg.is_file()):
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
    """A linked venv's scripts name the interpreter of the venv they came from: point them at the new one, each
    through a new file renamed over the link (writing through it would change the other release's script too)."""
    for script in bin_dir.iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if old.encode() in data[:4096]:
                write_file(script, data.replace(old.encode(), new.encode()), mode=stat.S_IMODE(script.stat().st_mode))


def _install_models(bundle: Bundle, release_dir: Path, store: ModelStore, layout: Layout,
                    log: Callable[[str], None]) -> list[str]:
    """Copy the model files the store lacks (checked against their digest after the copy), then give the release
    its catalog and a link per file; returns the store files written."""
    written = []
    with Directory(release_dir / "models", create=True) as links:
        for rel in bundle.files_under("models"):
            name = rel[len("models/"):]
            if name == "catalog.toml":
                if links.sha256(name) != bundle.digests[rel]:
                    links.write(name, (bundle.path / rel).read_bytes())
                continue
            stored = store_name(rel, bundle.digests[rel])
            if rel not in bundle.stored and not store.holds(stored, (bundle.path / rel).stat().st_size):
                log(f"copying {rel}")
                store.add(bundle.path / rel, stored, bundle.digests[rel])
                written.append(str(layout.models / stored))
            link = release_dir / "models" / name
            if not (link.is_symlink() and Path(os.readlink(link)) == layout.models / stored):
                links.symlink(layout.models / stored, name)
    return written


def prune(layout: Layout, also_keep: str | None = None,
          keep_files: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Remove releases other than current and previous (and ``also_keep``, one being installed), then store files
    no kept release links to (but ``keep_files``: the store's copies a bundle being installed relies on), and
    copies that a power cut or a failure left half-done."""
    keep = {name for name in (current_release(layout), current_release(layout, "previous"), also_keep) if name}
    removed = []
    root = layout.prefix / "releases"
    for release in sorted(root.iterdir()) if root.is_dir() else []:
        if release.name not in keep:
            shutil.rmtree(release)
            removed.append(str(release))
    linked = {Path(os.readlink(link)).name for name in keep
              for link in (layout.release(name) / "models").glob("*")
              if link.is_symlink() and Path(os.readlink(link)).parent == layout.models}
    store = ModelStore.open_existing(layout.models)
    if store is not None:
        with store:
            removed += [str(p) for p in store.prune(linked | keep_files)]
    return removed


def _install_units(release_dir: Path, layout: Layout) -> list[str]:
    """The release's unit files, and its installer as the device's own (it was just verified with the rest):
    the files that changed, each replaced durably."""
    pairs = [(unit, layout.units_dir / unit.name) for unit in sorted((release_dir / "systemd").glob("*.service"))
             if layout.units_dir is not None]
    if layout.tool is not None and (release_dir / "bin/appliance-install-bundle").is_file():
        pairs.append((release_dir / "bin/appliance-install-bundle", layout.tool))
    changed = []
    for source, dest in pairs:
        if not dest.is_file() or dest.read_bytes() != source.read_bytes():
            write_file(dest, source.read_bytes(), 0o755 if dest == layout.tool else 0o644)
            changed.append(str(dest))
    return changed


def current_release(layout: Layout, link: str = "current") -> str | None:
    path = layout.prefix / link
    return Path(os.readlink(path)).name if path.is_symlink() else None


def _move(layout: Layout, release: str) -> None:
    """``previous`` to the release that was current, ``current`` to ``release``: each one rename (the link is
    never missing) followed by an fsync of the directory, after everything the release holds is on the disk."""
    if not (layout.release(release) / STAMP).is_file():
        raise BundleError(f"release {release} is not (completely) installed under {layout.prefix}/releases")
    flush_filesystem(layout.release(release))  # the model links, catalog and units written since the stamp
    if layout.models.is_dir():
        flush_filesystem(layout.models)
    old = current_release(layout)
    with Directory(layout.prefix) as prefix:
        if old is not None:
            prefix.symlink(Path("releases") / old, "previous")
        prefix.symlink(Path("releases") / release, "current")


def switch(layout: Layout, release: str, trial: tuple[int, float] = (0, 0.0)) -> bool:
    """Make ``release`` current, remembering the one it replaces as previous; False when it already was. With
    ``trial`` (starts, seconds each) > 0 starts and a release to go back to, the new release is on trial."""
    old = current_release(layout)
    if old == release:
        return False
    starts, ready_within = trial
    if old is not None and starts > 0:  # written before the switch: a power cut between leaves a stale trial only
        trials.save(layout.prefix, trials.Trial(release=release, previous=old, max_starts=starts,
                                                ready_within_s=ready_within, switched_at=trials.now()))
    else:
        trials.end(layout.prefix)
    trials.forget_rollback(layout.prefix)
    _move(layout, release)
    return True


def rollback(layout: Layout, expected_from: str | None = None) -> dict[str, Any]:
    """Make the previous release current again (``expected_from``: only if the current one is that release,
    so that a rollback the device already did by itself is not undone)."""
    with locked(layout):
        failed, previous = current_release(layout), current_release(layout, "previous")
        if expected_from is not None and failed != expected_from:
            return {"changed": False, "release": failed, "rolled_back_from": None,
                    "why": f"the current release is {failed}, not {expected_from}"}
        if previous is None:
            raise BundleError(f"{layout.prefix}/previous: no previous release to go back to")
        trials.end(layout.prefix)
        trials.forget_rollback(layout.prefix)
        _move(layout, previous)
        units = _install_units(layout.release(previous), layout)
    return {"changed": True, "release": previous, "rolled_back_from": failed, "units": units}


def start_attempt(layout: Layout) -> dict[str, Any]:
    """A start of the appliance (its ExecStartPre): counted when the current release is on trial; past its
    starts, the device goes back to the release it came from (and the service then starts that one)."""
    if not layout.prefix.is_dir():  # not installed from bundles: nothing to count
        return {"changed": False, "trial": None}
    with locked(layout):
        trial, running = trials.read(layout.prefix), current_release(layout)
        if trial is None:
            return {"changed": False, "trial": None}
        if trial.release != running:  # a power cut between the trial and the switch, or a rollback since
            trials.end(layout.prefix)
            return {"changed": True, "trial": None, "stale": trial.release}
        trial.starts += 1
        if trial.starts <= trial.max_starts:
            trials.save(layout.prefix, trial)
            return {"changed": True, "trial": asdict(trial)}
        if not (layout.release(trial.previous) / STAMP).is_file():
            trials.end(layout.prefix)  # nothing complete to go back to: the new release keeps trying
            return {"changed": True, "trial": None, "why": f"release {trial.previous} is gone; nothing to go back to"}
        record = {"from": trial.release, "to": trial.previous, "starts": trial.max_starts, "at": trials.now(),
                  "switched_at": trial.switched_at}
        # the record first: a power cut before the switch below makes the next start do all of this again
        trials.record_rollback(layout.prefix, record)
        _move(layout, trial.previous)
        record["units"] = _install_units(layout.release(trial.previous), layout)
        trials.end(layout.prefix)
        return {"changed": True, "trial": None, "rolled_back": record}


def mark_ready(layout: Layout) -> dict[str, Any]:
    """The service told systemd it serves (its ExecStartPost): the current release's trial is over, it stays."""
    if not layout.prefix.is_dir():
        return {"changed": False}
    with locked(layout):
        trial = trials.read(layout.prefix)
        if trial is None or trial.release != current_release(layout):
            return {"changed": False}
        trials.end(layout.prefix)
        return {"changed": True, "kept": trial.release, "starts": trial.starts}


def releases(layout: Layout) -> dict[str, Any]:
    root = layout.prefix / "releases"
    names = sorted(p.name for p in root.iterdir() if (p / STAMP).is_file()) if root.is_dir() else []
    trial = trials.read(layout.prefix)
    return {"current": current_release(layout), "previous": current_release(layout, "previous"), "releases": names,
            "trial": asdict(trial) if trial else None, "rolled_back": trials.rolled_back(layout.prefix),
            "changed": False}


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"{' '.join(command[:4])} ... failed (exit {result.returncode}):\n{tail}")
