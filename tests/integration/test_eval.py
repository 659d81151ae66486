"""`make eval`'s pipeline on the tiny test models: a real appliance, every model of the catalog whose file is
present, a report with a row per model and language, and a model that cannot load reported, not fatal."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.harness import REPO


def test_eval_reports_every_present_model_per_language(catalog_path, tmp_path):
    out = tmp_path / "quality.md"
    run = subprocess.run([sys.executable, "-m", "bench.eval", "--catalog", str(catalog_path), "--limit", "3",
                          "--max-tokens", "8", "--threads", "2", "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = out.read_text()
    for model in ("tiny", "tiny-f32", "tiny-chat", "slow", "corrupt"):
        assert re.search(rf"^\| {model} \| English \| \d/3 \(\d+%\) \| \d/3 \| - \| - \| - \| \d+ \| \d+ \|$", report,
                         re.M) or model == "corrupt", (model, report)
        assert f"\n## {model}\n" in report
    corrupt = report.split("\n## corrupt\n")[1]
    assert corrupt.count("error model_error: model 'corrupt': sha256 mismatch") == 3 and "**fail**" in corrupt
    assert "| corrupt | English | 0/3 (0%) | 0/3 | - | - | - | - | - |" in report
