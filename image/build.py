"""`make image [ARCH=arm64|amd64]`: the SD-card image (arm64, Raspberry Pi 3B+/4/400/CM4) or its QEMU twin (amd64).

    bundle (signed; built unless BUNDLE= names one) -> base root file system (cached) -> appliance layer
    -> genimage -> dist/appliance-<release>-rpi-arm64.img.xz   or   dist/appliance-<release>-amd64.img

Runs as root on Debian bookworm (mmdebstrap, chroot and binfmt_misc need it). Every step prints its time; a
summary with the step times and sizes is written next to the image as <image>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from appliance.release.verify import BundleError
from image import bundle as bundles
from image import disk, rootfs
from image.steps import REPO, BuildError, cache_dir, check_arch, say, step

NAMES = {"arm64": "rpi-arm64", "amd64": "amd64"}


def image_path(out: Path, release: str, arch: str) -> Path:
    return out / f"appliance-{release}-{NAMES[arch]}.img"


def build(arch: str, out: Path, *, bundle: Path | None = None, key: Path = bundles.DEFAULT_KEY,
          catalog: Path | None = None, compress: bool | None = None, keep_tree: bool = False) -> Path:
    check_arch(arch)
    if os.geteuid() != 0:
        raise BuildError("building an image needs root (mmdebstrap, chroot, binfmt_misc)")
    started = time.monotonic()
    times: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.monotonic()
        result = fn(*args, **kwargs)
        times[name] = round(time.monotonic() - t, 1)
        return result

    if bundle is None:
        bundle = timed("bundle", bundles.build, arch, out, catalog=catalog, key=key)
    release = tomllib.loads((bundle / "bundle.toml").read_text())["release"]
    timed("base", rootfs.base, arch)
    # one tree per build: builders share the cache, and a fixed path let two builds delete each other's tree
    (cache_dir() / "work").mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=f"rootfs-{arch}-", dir=cache_dir() / "work"))
    tree.chmod(0o755)  # it becomes the image's /
    signers = bundles.allowed_signers(bundles.signing_key(key))
    try:
        timed("layer", rootfs.appliance_layer, arch, bundle, signers, tree)
        image = timed("disk", disk.build, tree, arch, image_path(out, release, arch))
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)  # a failed build's tree is no use to anyone
        raise
    if not keep_tree:
        shutil.rmtree(tree)
    final = image
    if compress if compress is not None else arch == "arm64":
        final = timed("compress", disk.compress, image)
        image.unlink()
    summary = {"image": final.name, "arch": arch, "release": release, "bytes": final.stat().st_size,
               "seconds": round(time.monotonic() - started, 1), "steps": times,
               "bundle": bundle.name, **({"tree": str(tree)} if keep_tree else {})}
    final.with_name(final.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"image: {final} ({final.stat().st_size / 2**20:.0f} MiB) in {summary['seconds']:.0f} s: {times}")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="arm64")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--bundle", type=Path, help="a bundle directory to put in (default: build one)")
    parser.add_argument("--catalog", type=Path, help="models for the bundle that is built (default: the embedded)")
    parser.add_argument("--key", type=Path, default=bundles.DEFAULT_KEY, help="the bundle signing key; its .pub "
                        "is the key the image trusts for updates")
    parser.add_argument("--compress", action=argparse.BooleanOptionalAction, default=None,
                        help="xz the image (default: arm64 yes, amd64 no)")
    args = parser.parse_args(argv)
    try:
        with step(f"image for {args.arch}"):
            build(args.arch, args.out, bundle=args.bundle, key=args.key, catalog=args.catalog,
                  compress=args.compress)
    except (BuildError, BundleError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
