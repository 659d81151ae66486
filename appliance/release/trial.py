"""Boot counting for a newly switched release, the way RAUC and Mender count boot attempts, for the release tree.

A switch to a new release starts its trial; the release must reach ``ready`` within ``max_starts`` starts of the
appliance (reboots and restarts alike), or the device goes back to the release it came from by itself:

    install (switch)   trial.json {release, previous, starts: 0, ...} written, then ``current`` switched
    every start        ExecStartPre ``appliance-install-bundle trial start``: starts + 1, written before the
                       service runs; past max_starts: ``current`` back to previous, rolled-back.json says why
    the service        on trial, tells systemd READY=1 only once it serves, and exits (so the next start counts)
                       when its default model cannot load, its worker gives up, or ready_within_s passes
    READY=1            ExecStartPost ``appliance-install-bundle trial ready``: trial.json removed, release kept

Both files live beside the ``current`` link (/opt/appliance, root's), are written durably and are readable by the
service, which shows them in its status. Standard library only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .safefs import Directory, UnsafePathError

TRIAL = "trial.json"
ROLLED_BACK = "rolled-back.json"
MAX_STARTS = 3  # starts a new release gets to reach ready (systemd allows 5 starts in 10 minutes: 3 + the rollback)
READY_WITHIN_S = 600  # seconds one start of a release on trial may take to serve (TimeoutStartSec is 900)


@dataclass
class Trial:
    release: str
    previous: str
    starts: int = 0
    max_starts: int = MAX_STARTS
    ready_within_s: float = READY_WITHIN_S
    switched_at: str = ""

    def describe(self) -> str:
        return (f"release {self.release} on trial: start {self.starts} of {self.max_starts} (back to "
                f"{self.previous} unless it serves)")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _load(prefix: Path, name: str) -> dict[str, Any] | None:
    try:
        with Directory(prefix) as d:
            data = d.read(name, limit=64 * 1024)
    except (FileNotFoundError, UnsafePathError):
        return None
    if data is None:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None  # a file cut short by hand; a power cut cannot do this to a file written by rename
    return body if isinstance(body, dict) else None


def read(prefix: Path) -> Trial | None:
    body = _load(prefix, TRIAL)
    if body is None:
        return None
    try:
        return Trial(**{k: body[k] for k in Trial.__dataclass_fields__ if k in body})
    except TypeError:
        return None


def save(prefix: Path, trial: Trial) -> None:
    with Directory(prefix, create=True) as d:
        d.write(TRIAL, json.dumps(asdict(trial)) + "\n")


def end(prefix: Path) -> bool:
    with Directory(prefix) as d:
        return d.unlink(TRIAL)


def rolled_back(prefix: Path) -> dict[str, Any] | None:
    """What the device went back from by itself, when, and after how many starts; None when it has not."""
    return _load(prefix, ROLLED_BACK)


def record_rollback(prefix: Path, record: dict[str, Any]) -> None:
    with Directory(prefix) as d:
        d.write(ROLLED_BACK, json.dumps(record) + "\n")


def forget_rollback(prefix: Path) -> bool:
    """A later switch, an operator's decision, closes the record of the last automatic rollback."""
    with Directory(prefix) as d:
        return d.unlink(ROLLED_BACK)


def rollback_warning(record: dict[str, Any]) -> str:
    return (f"update to release {record.get('from')} did not reach ready in {record.get('starts')} starts; the "
            f"device went back to {record.get('to')} by itself at {record.get('at')}")
