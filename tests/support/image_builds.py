"""The images the timing-bound (`quiet`) system tests boot, built in a child process at the lowest CPU and I/O
priority while the other tests run, so that it takes only the time they leave idle (the fleet's VMs leave most of a
core idle once the tiers beside it have finished) and the quiet part of the run holds only what its bounds measure.
The arm64 image alone is 4-5 minutes of building and compressing on the 2-core CI machine.

The system tier's conftest starts the builds its selected tests need (none for a run that needs none) and orders the
quiet modules by the last image they need; a fixture that needs an image waits for that one only. A build still
running beside a quiet module takes only what the module leaves idle (nice 19 against 0 is a CPU share of 15 to
1024). The child builds one image after another, writes what each became (or why it failed) to ``results.json`` and
its progress to ``builds.log``.

    python -m tests.support.image_builds SPEC.json      (what ImageBuilds runs; SPEC names the jobs)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# job name -> the session fixture that takes its value from it (a job runs when a selected test uses that fixture),
# in the order the child builds them: the short one first, so that its tests need not wait for the long one (on a
# machine with no build cache the arm64 image waits for a Debian base built under qemu-user: half an hour)
JOBS = {
    "amd64-default": "amd64_default_image",  # `make image ARCH=amd64`: the embedded default model
    "arm64": "arm64_image",  # `make image`: the tiny catalog, compressed, then expanded to boot
}


class ImageBuildFailed(Exception):
    """A prebuilt image could not be built: the message carries the end of the build's log."""


def build_job(name: str, out: Path, catalog: Path, key: Path) -> dict[str, str]:
    """One job, as the fixtures that used to build it in the test process did; the paths it made."""
    from image import build, bundle
    out.mkdir(parents=True, exist_ok=True)
    if name == "arm64":
        built = bundle.build("arm64", out / "dist-arm64", catalog=catalog, key=key, tarball=False)
        packed = build.build("arm64", out / "image-arm64", bundle=built, key=key, compress=True, keep_tree=True)
        raw = packed.parent / "raw.img"
        with raw.open("wb") as f:
            subprocess.run(["xz", "-dc", str(packed)], stdout=f, check=True)
        # the tree is kept for the tests that read it; ImageBuilds.close removes it (one per build, in the shared cache)
        tree = json.loads(packed.with_name(packed.name + ".json").read_text())["tree"]
        return {"packed": str(packed), "raw": str(raw), "tree": tree}
    if name == "amd64-default":
        built = bundle.build("amd64", out / "dist-default", key=key, tarball=False)
        image = build.build("amd64", out / "image-default", bundle=built, key=key, compress=False)
        return {"image": str(image)}
    raise ValueError(f"no image job named {name!r}; known: {', '.join(JOBS)}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    results: dict[str, dict[str, Any]] = {}  # job -> {"built": {name: path}} or {"error": traceback}
    for name in spec["jobs"]:
        started = time.monotonic()
        try:
            results[name] = {"built": build_job(name, out / name, Path(spec["catalog"]), Path(spec["key"]))}
        except Exception:  # noqa: BLE001 - the fixture that waits for this job reports it; the next job still runs
            results[name] = {"error": traceback.format_exc(limit=8)}
        print(f"== {name}: {'built' if 'built' in results[name] else 'FAILED'} in {time.monotonic() - started:.0f} s",
              flush=True)
        partial = out / "results.json.part"
        partial.write_text(json.dumps(results, indent=2))
        partial.replace(out / "results.json")
    return 0


class ImageBuilds:
    """The child that builds ``jobs`` into ``out``, started at once under ``nice -n 19`` and ``ionice -c 3``."""

    def __init__(self, jobs: list[str], out: Path, *, catalog: Path, key: Path):
        self.jobs, self.out = jobs, out
        self.log = out / "builds.log"
        spec = out / "spec.json"
        spec.write_text(json.dumps({"jobs": jobs, "out": str(out), "catalog": str(catalog), "key": str(key)}))
        with self.log.open("ab") as log:
            self._child = subprocess.Popen(
                ["nice", "-n", "19", "ionice", "-c", "3", sys.executable, "-m", "tests.support.image_builds",
                 str(spec)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def _results(self) -> dict[str, dict[str, Any]]:
        results_file = self.out / "results.json"  # replaced whole after each job (never read half-written)
        return json.loads(results_file.read_text()) if results_file.is_file() else {}

    def result(self, job: str) -> dict[str, Path]:
        """The paths ``job`` made, once built (the jobs after it may still be building); ImageBuildFailed with its
        error and the log's end if it failed."""
        if job not in self.jobs:
            raise ValueError(f"image job {job!r} was not started (started: {self.jobs})")
        while (got := self._results().get(job)) is None and self._child.poll() is None:
            time.sleep(1)
        got = got or self._results().get(job)  # written just before the child ended
        if got is None or "built" not in got:
            tail = self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else "(no log)"
            error = got["error"] if got else f"the builder ended with {self._child.returncode}"
            raise ImageBuildFailed(f"the {job} image was not built:\n{error}\n--- {self.log} (end):\n{tail}")
        return {name: Path(path) for name, path in got["built"].items()}

    def close(self) -> None:
        """Stop a build still running (a session that ended early: SIGINT, so that the build's own clean-up runs)
        and remove the root trees the builds kept; idempotent."""
        if self._child.poll() is None:
            self._child.send_signal(signal.SIGINT)
            try:
                self._child.wait(30)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        for got in self._results().values():
            if "tree" in got.get("built", {}):
                shutil.rmtree(got["built"]["tree"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
