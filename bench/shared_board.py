"""`make bench`, part of bench/batching.py: the appliance on a board whose cores something else keeps busy.

On a Pi the worker's threads share the cores with mosquitto, the service and whatever sensor app the device runs.
llama.cpp's threads meet at an OpenMP barrier after every step of the graph; libgomp lets a waiting thread spin
300000 times before it sleeps, and a spinning thread burns the time slice its preempted partner needs. The
appliance starts its children with ``GOMP_SPINCOUNT=300`` (appliance/process/handle.py, ``CHILD_ENV``); here the same
appliance runs twice with half the cores kept busy by a process that only loops, once as shipped and once with
libgomp's own default put back through the service's environment (which wins over ``CHILD_ENV``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}  # what libgomp spins when OMP_WAIT_POLICY is unset


@dataclass(frozen=True)
class SharedBoard:
    busy: int  # processes looping beside the appliance, one core each
    shipped: tuple[float, float]  # tok/s of one client and of 4 at once, as the appliance ships
    spinning: tuple[float, float]  # the same with libgomp's default spin count


def measure(start: Callable[[dict[str, str]], Any], aggregate: Callable[[str, int, int], float], cores: int,
            tokens: int, rounds: int) -> SharedBoard:
    """``start(env)`` returns a started appliance (stopped here); ``aggregate(base, clients, tokens)`` its tok/s."""
    busy = max(1, cores // 2)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        figures: list[tuple[float, float]] = []
        for env in ({}, LIBGOMP_DEFAULT):
            app = start(env)
            try:
                base = app.http_url
                aggregate(base, 1, tokens)  # warm-up
                single, four = (statistics.median(aggregate(base, clients, tokens) for _ in range(rounds))
                                for clients in (1, 4))
                figures.append((single, four))
            finally:
                app.stop()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return SharedBoard(busy, figures[0], figures[1])


def rows(board: SharedBoard, cores: int) -> list[str]:
    out = []
    for i, clients in enumerate(("single client", "4 clients at once, aggregate")):
        mine, theirs = board.shipped[i], board.spinning[i]
        out.append(f"| {board.busy} of {cores} cores kept busy by another process, {clients} | {mine:.1f} tok/s; "
                   f"with libgomp's default spinning {theirs:.1f} tok/s; {mine / theirs:.2f}x | reported |")
    return out
