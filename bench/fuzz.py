"""`make fuzz`: the full fuzz campaign (issue 10) against a running appliance on a private mosquitto.

    .venv/bin/python -m bench.fuzz --payloads 10000 --seed 1 --out docs/reliability.md

Starts mosquitto and `appliance serve` on tiny generated models (so a valid request is answered in milliseconds and
the campaign spends its time on the parsers and the delivery paths), sends the payloads one at a time
(tests/support/fuzz_campaign.py) and writes the counts into the ``fuzz`` section of the report. Exits 1 when a
payload got `internal`, no reply or two replies, when the worker restarted, or when the service is not ready at the
end; the payloads behind each failure are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from appliance import __version__
from bench.private_appliance import private_appliance
from bench.report_sections import replace_section
from tests.support.fuzz_campaign import Campaign, Tally, write_catalog


def report(tally: Tally, seed: int) -> str:
    failures = tally.failures()
    targets = ", ".join(f"{target} {n}" for target, n in sorted(tally.sent.items()))
    outcomes = ", ".join(f"`{code}` {n}" for code, n in tally.outcomes.most_common())
    lines = [
        f"Last run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, appliance {__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores; `python -m bench.fuzz --payloads {tally.total} --seed {seed}`.",
        "",
        "| what | count |",
        "|---|---|",
        f"| payloads sent | {tally.total} ({targets}) |",
        f"| `internal` errors or HTTP 5xx | {len(tally.internal)} |",
        f"| payloads with no reply | {len(tally.lost)} |",
        f"| payloads answered twice | {len(tally.twice)} |",
        f"| worker restarts (crashes) | {tally.restarts} |",
        f"| `appliance_errors_total{{code=\"internal\"}}` at the end | {tally.internal_metric} |",
        f"| service `ready` at the end | {'yes' if tally.ready_at_end else 'NO'} |",
        f"| time | {tally.seconds:.0f} s ({tally.total / max(tally.seconds, 1e-9):.0f} payloads/s) |",
        "",
        f"Answers by outcome: {outcomes}.",
    ]
    if failures:
        lines += ["", "Failures:", ""] + [f"- `{f[:300]}`" for f in failures[:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the figures into this report's `fuzz` section")
    args = parser.parse_args(argv)
    with private_appliance("tiny", {"max_queue": 16}, write_catalog) as (broker, app):
        campaign = Campaign(app, broker.host, broker.port)
        try:
            print(f"fuzz: {args.payloads} payloads, seed {args.seed}", flush=True)
            tally = campaign.run(args.payloads, args.seed)
        finally:
            campaign.close()
        tracebacks = app.log_text().count("Traceback")
    text = report(tally, args.seed)
    if tracebacks:
        text += f"\n\nThe service logged {tracebacks} tracebacks."
    print(text)
    if args.out:
        replace_section(args.out, "fuzz", text)
    return 1 if tally.failures() or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
