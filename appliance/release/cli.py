"""``appliance-install-bundle verify|install|rollback|list|trial``: the device's bundle installer.

Exit codes: 0 done (the JSON line on stdout says whether anything changed), 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import trial as trials
from .install import Layout, install, mark_ready, releases, rollback, start_attempt
from .verify import BundleError, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-install-bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--signers", type=Path, default=Path("/etc/appliance/bundle-signers"),
                        help="allowed-signers file of the keys trusted to sign bundles")
    parser.add_argument("--prefix", type=Path, default=Layout.prefix)
    parser.add_argument("--state-dir", type=Path, default=Layout.state_dir)
    parser.add_argument("--units-dir", default=str(Layout.units_dir), help="where unit files go; '' for nowhere")
    parser.add_argument("--tool", default=str(Layout.tool), help="where the device keeps this installer (updated "
                        "from each release switched to); '' for nowhere")
    parser.add_argument("--arch", help="the device's architecture (default: this machine's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("verify", "check a bundle, install nothing"), ("install", "verify, install, activate")):
        p = sub.add_parser(name, help=text)
        p.add_argument("bundle", type=Path)
    add = sub.choices["install"].add_argument
    add("--no-activate", action="store_true", help="install but keep `current`")
    add("--discard-models", action="store_true", help="delete the bundle's model files once the store holds them "
        "(a staging copy)")
    add("--allow-downgrade", action="store_true", help="install a bundle older than the running release")
    add("--trial-starts", type=int, default=trials.MAX_STARTS, metavar="N", help="starts the new release gets to "
        f"reach ready before the device goes back to the previous one by itself (default {trials.MAX_STARTS}; "
        f"0: no trial)")
    add("--trial-ready-within", type=float, default=trials.READY_WITHIN_S, metavar="SECONDS",
        help=f"how long one start on trial may take to serve (default {trials.READY_WITHIN_S})")
    back = sub.add_parser("rollback", help="make the previous release current again")
    back.add_argument("--from", dest="expected_from", metavar="RELEASE",
                      help="only if RELEASE is current (a rollback the device already did is not undone)")
    sub.add_parser("list", help="installed releases, current and previous, the trial and the last self-rollback")
    trial = sub.add_parser("trial", help="boot counting, run by appliance.service: `start` (ExecStartPre) counts a "
                           "start of a release on trial, `ready` (ExecStartPost) keeps it")
    trial.add_argument("event", choices=["start", "ready"])
    args = parser.parse_args(argv)
    layout = Layout(prefix=args.prefix, state_dir=args.state_dir, units_dir=Path(args.units_dir) if args.units_dir
                    else None, tool=Path(args.tool) if args.tool else None)
    result: dict[str, Any]
    try:
        if args.command in ("verify", "install"):
            # `verify` checks every file; `install` does not hash again what a release installed from the same
            # MANIFEST would not read (verify's docstring)
            bundle = verify(args.bundle, args.signers, args.arch, store=layout.models,
                            releases=layout.prefix / "releases" if args.command == "install" else None)
            if args.command == "verify":
                result = {"changed": False, "release": bundle.release, "version": bundle.version, "verified": True}
            else:
                result = install(bundle, layout, activate=not args.no_activate, discard_models=args.discard_models,
                                 allow_downgrade=args.allow_downgrade,
                                 trial=(max(args.trial_starts, 0), args.trial_ready_within),
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
        elif args.command == "rollback":
            result = rollback(layout, args.expected_from)
        elif args.command == "trial":
            result = start_attempt(layout) if args.event == "start" else mark_ready(layout)
        else:
            result = releases(layout)
    except (BundleError, OSError) as exc:
        print(f"appliance-install-bundle: refused: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    if args.command == "trial" and result.get("rolled_back"):
        print(f"appliance-install-bundle: {trials.rollback_warning(result['rolled_back'])}", file=sys.stderr)
    return 0
