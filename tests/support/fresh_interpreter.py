"""A script run in a fresh interpreter, for what must be seen in a process of its own (which modules a worker
imports, what a model prints while it loads) or would crash pytest's (a llama.cpp abort)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.harness import REPO


def last_json_line(script: str, *args: str, timeout: float = 120) -> Any:
    """Run ``script`` with ``args`` (``sys.argv[1:]``) on this repository's code (``-P``: the working directory is not
    importable) and parse its last line of output as JSON; a failure shows the end of its stderr."""
    result = subprocess.run([sys.executable, "-P", "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_HELLO_THERE = r"""
import json, sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_batch=256, n_threads=2, verbose=False)
print(json.dumps(llm.create_completion("hello there", max_tokens=8, temperature=0)["choices"][0]["text"]))
"""


def llama_cpp_python_text(model: Path) -> str:
    """llama-cpp-python's own 8 tokens after "hello there" at temperature 0 on ``model``: the reference text for the
    tiny GGUFs (in a child process: an abort must not take pytest)."""
    text: str = last_json_line(_HELLO_THERE, str(model))
    return text
