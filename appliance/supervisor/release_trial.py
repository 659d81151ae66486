"""The release this service runs from and, after a switch, its trial, as the service sees them.

appliance/release/trial.py is the device's side (root, at every start of the unit): it counts the starts of a
newly switched release and goes back to the previous release after too many. This is the service's side. While
the release it runs is on trial, the service tells systemd READY=1 only once it serves, so the unit's
ExecStartPost (which keeps the release) means "it served"; and it gives this start up, exiting with
:data:`TRIAL_FAILED` so that systemd starts the unit again and the start is counted, when its default model cannot
load, its worker gives up, or the trial's ``ready_within_s`` passes without serving. Its status names the release,
the trial, and what the device went back from by itself.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.release import trial as trials
from appliance.status import SERVING, Status

log = logging.getLogger(__name__)

TRIAL_FAILED = 75  # exit status of a start that gave up on trial (EX_TEMPFAIL): Restart=on-failure starts it again


@dataclass(frozen=True)
class RunningRelease:
    prefix: Path  # /opt/appliance
    name: str
    previous: str | None
    trial: trials.Trial | None  # this release's trial, while it is on one
    rolled_back: dict[str, Any] | None  # the device's last rollback by itself, when it went back to this release

    @classmethod
    def detect(cls, python_prefix: str | None = None) -> RunningRelease | None:
        """The installed release whose venv runs this process (``<prefix>/releases/<name>/venv``), else None (a
        checkout, a pip install)."""
        venv = Path(python_prefix or sys.prefix).resolve()
        release_dir = venv.parent
        if venv.name != "venv" or release_dir.parent.name != "releases":
            return None
        prefix, name = release_dir.parent.parent, release_dir.name
        previous = prefix / "previous"
        trial, record = trials.read(prefix), trials.rolled_back(prefix)
        return cls(prefix=prefix, name=name, previous=previous.readlink().name if previous.is_symlink() else None,
                   trial=trial if trial is not None and trial.release == name else None,
                   rolled_back=record if record is not None and record.get("to") == name else None)

    def to_status(self) -> dict[str, Any]:
        t = self.trial
        return {"name": self.name, "previous": self.previous,
                "trial": None if t is None else {"start": t.starts, "of": t.max_starts, "back_to": t.previous,
                                                 "ready_within_s": t.ready_within_s},
                "rolled_back": self.rolled_back}

    def warnings(self) -> tuple[str, ...]:
        return (trials.rollback_warning(self.rolled_back),) if self.rolled_back else ()


class TrialWatch:
    """Whether this start of a release on trial serves, or gives up on it (once)."""

    def __init__(self, release: RunningRelease, default_model_failure: Callable[[], str | None],
                 give_up: Callable[[str], None]) -> None:
        assert release.trial is not None
        self.release = release
        self.trial = release.trial
        self._default_model_failure = default_model_failure
        self._give_up = give_up
        self._lock = threading.Lock()
        self._decided = False
        self._timer = threading.Timer(self.trial.ready_within_s, self._too_slow)
        self._timer.daemon = True

    def start(self) -> None:
        log.warning("%s", self.trial.describe())
        self._timer.start()

    def may_report_ready(self, status: Status) -> bool:
        """READY=1 for systemd: only once serving, so that the unit's ExecStartPost keeps the release."""
        return status.state in SERVING

    def on_status(self, status: Status) -> None:
        if status.state in SERVING:
            if self._decide():
                self._timer.cancel()
                log.info("release %s serves on start %d of its trial; systemd keeps it", self.release.name,
                         self.trial.starts)
            return
        failure = f"the inference worker gave up ({status.reason})" if status.state == "error" else \
            self._default_model_failure()
        if failure:
            self._fail(failure)

    def _too_slow(self) -> None:
        self._fail(f"not serving {self.trial.ready_within_s:.0f} s after it started")

    def _decide(self) -> bool:
        with self._lock:
            if self._decided:
                return False
            self._decided = True
            return True

    def _fail(self, why: str) -> None:
        if not self._decide():
            return
        message = (f"release {self.release.name} on trial, start {self.trial.starts} of {self.trial.max_starts}: "
                   f"{why}; giving this start up (after {self.trial.max_starts} such starts the device goes back "
                   f"to {self.trial.previous})")
        log.error("%s", message)
        self._give_up(message)

    def close(self) -> None:
        self._timer.cancel()
