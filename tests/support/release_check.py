"""Run on a device by its own /usr/bin/python3 (not a release's, which might be the broken thing): is ``current``
one whole release? Prints JSON: for current and previous, the release, its stamp and the appliance version its
bundle.toml names; for current also every installed file checked against its wheel's RECORD digest, and its
model links against the catalog's digests.

    sudo python3 - /opt/appliance < release_check.py
"""

import base64
import csv
import hashlib
import json
import sys
import tomllib
from pathlib import Path


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()  # RECORD's form


def check(release: Path, deep: bool) -> dict:
    info = {"name": release.name, "stamp": (release / ".complete").is_file(), "files": 0, "bad": []}
    try:
        info["version"] = tomllib.loads((release / "bundle.toml").read_text())["version"]
    except (OSError, ValueError, KeyError) as exc:
        info["bad"].append(f"bundle.toml: {exc}")
    if not deep:
        return info
    for site in sorted((release / "venv/lib").glob("python3*/site-packages")):
        for record in sorted(site.glob("*.dist-info/RECORD")):
            for row in csv.reader(record.read_text().splitlines()):
                # scripts (../../../bin) are rewritten for the release they were copied to: not the wheel's bytes
                if len(row) < 2 or not row[1] or row[0].startswith(".."):
                    continue
                algorithm, _, expected = row[1].partition("=")
                info["files"] += 1
                try:
                    actual = _digest(site / row[0], algorithm)
                except OSError as exc:
                    info["bad"].append(f"{row[0]}: {exc.strerror}")
                    continue
                if actual != expected:
                    info["bad"].append(f"{row[0]}: {(site / row[0]).stat().st_size} bytes, not as installed")
    try:
        catalog = tomllib.loads((release / "models/catalog.toml").read_text())
    except (OSError, ValueError) as exc:
        info["bad"].append(f"models/catalog.toml: {exc}")
        catalog = {}
    for entry in catalog.get("models", []):
        link = release / "models" / entry["file"]
        try:
            actual = hashlib.sha256(link.read_bytes()).hexdigest()
        except OSError as exc:
            info["bad"].append(f"models/{entry['file']}: {exc.strerror}")
            continue
        if actual != entry.get("sha256", actual):
            info["bad"].append(f"models/{entry['file']}: sha256 {actual}, not the catalog's")
    return info


def main() -> None:
    prefix = Path(sys.argv[1] if len(sys.argv) > 1 else "/opt/appliance")
    out = {}
    for link in ("current", "previous"):
        path = prefix / link
        out[link] = check(path.resolve(), deep=link == "current") if path.is_symlink() else None
    releases = prefix / "releases"
    out["unstamped"] = sorted(p.name for p in releases.iterdir() if not (p / ".complete").is_file()) \
        if releases.is_dir() else []
    print(json.dumps(out))


main()
