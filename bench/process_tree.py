"""`make bench`, part of bench/batching.py: what a process and all its descendants hold and use, from /proc."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (those that exit meanwhile are left out)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@dataclass(frozen=True)
class ProcessMemory:
    name: str  # the kernel's name for it: a child of the appliance sets its own ("appliance-llm")
    rss: int  # bytes resident, pages shared with other processes counted in full
    pss: int  # bytes resident, each shared page divided among the processes that map it


def tree_memory(pid: int) -> list[ProcessMemory]:
    """Resident memory of the process and each of its descendants, from /proc. RSS sums count the pages the
    processes share (the interpreter, libc, the page cache of a mapped model) once per process, as ``ps`` shows
    them; PSS sums count each page once, split among its users: the fair total for a tree of processes."""
    out = []
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            full = proc.memory_full_info()
            out.append(ProcessMemory(proc.name(), full.rss, full.pss))
    return out


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per process of the tree, including what exited children handed to their
    parent (``children_user``/``children_system``)."""
    seconds: dict[int, float] = {}
    for proc in tree(pid):
        try:
            t = proc.cpu_times()
            seconds[proc.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return seconds


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """CPU used by the whole process tree over ``seconds`` of wall time with no requests, in percent of one core.
    A child that starts within the window counts in full; one that starts and exits within it counts through its
    parent's ``children_*`` times."""
    before = tree_cpu_seconds(pid)
    started = time.monotonic()
    time.sleep(seconds)
    after = tree_cpu_seconds(pid)
    wall = time.monotonic() - started
    used = sum(max(0.0, spent - before.get(p, 0.0)) for p, spent in after.items())
    return 100 * used / wall


def memory_rows(app: list[ProcessMemory], server: list[ProcessMemory] | None) -> list[str]:
    """The table's memory rows: RSS as the issue states the target, PSS as the fair sum over several processes."""
    mib = 1024 * 1024
    each = ", ".join(f"{p.name} {p.rss / mib:.0f}/{p.pss / mib:.0f}" for p in app)
    rows = []
    for kind in ("rss", "pss"):
        mine = sum(getattr(p, kind) for p in app)
        theirs = sum(getattr(p, kind) for p in server) if server else None
        rows.append(f"| {kind.upper()} after the runs, appliance ({len(app)} processes) | {mine / mib:.0f} MiB"
                    + (f"; llama-server -np 4 {theirs / mib:.0f} MiB; appliance {mine / theirs:.2f}x | <= 1.15x |"
                       if theirs else "; llama-server not measured | <= 1.15x |"))
    rows.append(f"| per process, RSS/PSS MiB | {each} | |")
    return rows
