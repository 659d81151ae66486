"""A real terminal for interactive commands: a detached tmux session that tests type into (send-keys) and read
(capture-pane), as a person at a keyboard would."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable

import pytest

from tests.support.harness import REPO


class Terminal:
    def __init__(self, command: list[str], *, width: int = 160, height: int = 60) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is required for the terminal tests (apt install tmux)")
        self.name = f"appliance-test-{uuid.uuid4().hex[:8]}"
        # the exit status is printed when the command ends, and the pane kept so it can be read
        script = f"{shlex.join(command)}; echo EXIT=$?; sleep 600"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        "bash", "-c", script], check=True, env=env)
        subprocess.run(["tmux", "set-option", "-t", self.name, "history-limit", "5000"], check=True)

    def send(self, *keys: str) -> None:
        """Keys as tmux names them: text, "Enter", "C-c", "C-d"."""
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, line: str) -> None:
        self.send("-l", line)  # literally, so "/reset" is not read as a key name
        self.send("Enter")

    def screen(self) -> str:
        """Everything the pane shows, scrollback included, as plain text (wrapped lines joined)."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", self.name], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 120, what: str = "") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.1)
        raise TimeoutError(f"the terminal never showed {what or predicate} within {timeout} s:\n{self.screen()}")

    def wait_prompts(self, count: int, timeout: float = 180) -> str:
        """Until the chat's prompt has been shown ``count`` times (each answer ends with a new one)."""
        return self.wait_for(lambda s: s.count(">>> ") >= count, timeout, f"{count} prompts")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False, capture_output=True)
