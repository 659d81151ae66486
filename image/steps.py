"""Progress and plumbing shared by the build steps: timed, named steps; commands that fail with their output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHES = ("arm64", "amd64")
DEBIAN_ARCH_OF_MACHINE = {"x86_64": "amd64", "aarch64": "arm64"}


class BuildError(Exception):
    """A build step failed; the message names the step and shows the end of the command's output."""


def cache_dir() -> Path:
    """Downloads and build products kept between builds (``APPLIANCE_CACHE``, default ~/.cache/appliance-image)."""
    path = Path(os.environ.get("APPLIANCE_CACHE") or Path.home() / ".cache" / "appliance-image")
    path.mkdir(parents=True, exist_ok=True)
    return path


def say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    say(f"{name} ...")
    try:
        yield
    except BaseException:
        say(f"{name}: FAILED after {time.monotonic() - started:.0f} s")
        raise
    say(f"{name}: done in {time.monotonic() - started:.0f} s")


def run(command: list[str], *, env: dict | None = None, cwd: Path | None = None, quiet: bool = True,
        timeout: float | None = None) -> str:
    """Run a command; its output is kept and shown only when it fails (or always, with quiet=False)."""
    full_env = {**os.environ, **(env or {})}
    if not quiet:
        say("$ " + shlex.join(command))
    result = subprocess.run(command, env=full_env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout)
    if not quiet and result.stdout:
        sys.stderr.write(result.stdout)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise BuildError(f"{shlex.join(command)[:300]} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def digest_of(*parts: bytes | str | Path) -> str:
    """A short key for a cache entry: the sha256 of the given strings and files' contents."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(part.read_bytes())
        else:
            digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise BuildError(f"ARCH={arch!r}: expected one of {', '.join(ARCHES)}")
    return arch
