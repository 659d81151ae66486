"""Put a release's software together in its staging directory from what the device already holds, so that a play
sends only the files that changed (an update that changes the appliance's own wheel sends that wheel, not the 80 MB
of numpy, llama.cpp and onnxruntime again over a rural link).

    python3 gather_release.py <staging directory> <release>

Reads <staging>/<release>/MANIFEST (sent just before; ``sha256sum`` format) and, for every file it lists outside
models/ (the models role sends those): keeps the staged copy if its sha256 matches; else hard-links a file with that
sha256 from another release staged beside it (found through that release's MANIFEST, and hashed again before it is
used); else counts it missing. Files the MANIFEST does not list are removed (the installer refuses a bundle that
holds any). Prints {"linked": [...], "removed": [...], "missing": [...]} as JSON; the play sends the missing ones.

Nothing here is trusted: the installer checks the signature and every digest again before it installs anything.
Runs on the device with Debian's python3, standard library only; root runs it in a directory only root can write,
and it still neither follows nor links a symbolic link. It reads the MANIFEST itself rather than through the
device's installer (appliance/release/verify.py), which may be older than this role and is replaced by the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path, PurePosixPath

SIGNED = ("MANIFEST", "MANIFEST.sig")  # sent by the play with the MANIFEST itself, not listed in it
MODELS = "models"  # the models role's part of the staging directory


def software(manifest: Path) -> dict[str, str]:
    """{relative path: sha256} for the files a MANIFEST lists outside models/; a path that could leave the
    directory is an error."""
    files = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        digest, sep, rel = line.partition("  ")
        path = PurePosixPath(rel)
        if not sep or len(digest) != 64 or path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"{manifest}: not a MANIFEST line: {line!r}")
        if path.parts[0] != MODELS:
            files[path.as_posix()] = digest
    return files


def sha256(path: Path) -> str | None:
    """The file's sha256, or None when it is missing or not a regular file (a link is never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def held_elsewhere(staging: Path, release: str) -> dict[str, list[Path]]:
    """{sha256: [files]} from the MANIFEST of every other release staged on the device."""
    held: dict[str, list[Path]] = {}
    for other in sorted(staging.iterdir()):
        manifest = other / "MANIFEST"
        if other.name == release or other.is_symlink() or not other.is_dir() or not manifest.is_file():
            continue
        try:
            files = software(manifest)
        except ValueError:  # UnicodeDecodeError too
            continue  # a damaged leftover is only a source we cannot use
        for rel, digest in files.items():
            held.setdefault(digest, []).append(other / rel)
    return held


def unlisted(release_dir: Path, wanted: dict[str, str]) -> list[str]:
    """Files and links under the release's directory (outside models/) that its MANIFEST does not list."""
    extra = []
    for root, dirs, names in os.walk(release_dir):
        here = Path(root)
        if here == release_dir:
            dirs[:] = [d for d in dirs if d != MODELS]
        for name in names + [d for d in dirs if (here / d).is_symlink()]:
            rel = (here / name).relative_to(release_dir).as_posix()
            if rel not in wanted and rel not in SIGNED:
                extra.append(rel)
    return sorted(extra)


def gather(staging: Path, release: str) -> dict[str, list[str]]:
    release_dir = staging / release
    wanted = software(release_dir / "MANIFEST")
    removed = unlisted(release_dir, wanted)
    for rel in removed:
        (release_dir / rel).unlink()
    held = held_elsewhere(staging, release)
    linked, missing = [], []
    for rel, digest in sorted(wanted.items()):
        target = release_dir / rel
        if sha256(target) == digest:
            continue
        if target.is_symlink() or target.exists():
            target.unlink()  # a wrong or partly written copy: replaced, never written through
        source = next((path for path in held.get(digest, ()) if sha256(path) == digest), None)
        if source is None:
            missing.append(rel)
            continue
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.link(source, target, follow_symlinks=False)
        linked.append(rel)
    return {"linked": linked, "removed": removed, "missing": missing}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    try:
        print(json.dumps(gather(Path(sys.argv[1]), sys.argv[2])))
    except ValueError as error:
        raise SystemExit(str(error)) from None
