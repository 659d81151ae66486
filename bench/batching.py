"""`make bench`, issue 18: continuous batching (``worker.parallel = 4``) on the embedded default model.

One appliance with four slots, over HTTP, the same prompt and parameters as bench/run.py:

- aggregate tok/s of 4 concurrent clients against the same appliance's single-client rate (target >= 1.5x), and
  against C++ ``llama-server -np 4`` when ``--llama-server PATH`` names one built from llama-cpp-python's vendored
  llama.cpp (target >= 1.0x; ``scripts/build-llama-server`` builds and caches one, ``make bench`` passes it);
- memory: RSS of the appliance (the service, its worker and any other children) after the runs against
  ``llama-server``'s (same model, context, ``-np 4``, threads) after the same kind of runs, as a ratio (target
  <= 1.15x);
- idle CPU of the whole appliance (service and all its children) over ``--idle-seconds`` (60) once the runs are
  over, in percent of one core (target <= 1 %);
- TTFT of a short request (a 16-token prompt, streamed) while a 512-token generation runs, against its TTFT on the
  idle device (target <= 2x);
- 8 MQTT clients against one device, half on the ``$share`` fleet topic and half on the device's own topic (both
  feed the batch): aggregate tok/s and p95 TTFT (first streamed chunk);
- a shared board: single-client and 4-client tok/s with half the cores kept busy by another process, the appliance
  as shipped against the same with libgomp's default spinning (bench/shared_board.py);
- determinism: at temperature 0, how many of ``--prompts`` prompts give the same text alone and batched four at a
  time (in-process, llama_cpp backend), and where the first difference is.

Ratios within one run only; nothing here is a timed assertion. The section is written between the ``batching``
markers of docs/benchmarks.md (bench/report_sections.py), as bench/run.py and bench/embeddings.py write theirs:
the page's prose between the sections stays.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from appliance.catalog import default_model
from appliance.transports.broker import Mosquitto, free_port
from bench import shared_board
from bench.report_sections import replace_section
from tests.support.harness import Appliance, MqttClient, new_appliance

PROMPT = "The history of the Raspberry Pi began in 2006, when"
SHORT = "In one sentence, the Raspberry Pi is a small and cheap computer that"  # about 16 tokens
PARAMS = {"temperature": 0, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0}


def post(base: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def first_text_seconds(base: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first piece of text (then the stream is read to its end)."""
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    started, first, any_chunk = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as resp:
        for line in resp:
            if first is None and line.startswith(b"data: {"):
                any_chunk = any_chunk or time.perf_counter() - started
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - started
    # an answer of only whitespace held back to its end still has a first chunk
    return first if first is not None else (any_chunk or float("nan"))


def concurrently(one: Callable[[int], None], clients: int) -> float:
    """Run ``one(0)`` ... ``one(clients - 1)`` on a thread each, all at once; the seconds until the last ends."""
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


_REQUESTS = itertools.count()  # every request's prompt its own: a repeated prompt would be served from kept logits


def aggregate(base: str, clients: int, tokens: int) -> float:
    """Completion tokens per second of ``clients`` requests sent at once, each with a prompt no request had before
    (the shared beginning is reused, the rest evaluated), so rounds compare generation with generation."""
    counts: list[int] = []

    def one(i: int) -> None:
        out = post(base, {"prompt": f"{PROMPT} ({next(_REQUESTS)})", "max_tokens": tokens, **PARAMS})
        counts.append(out["usage"]["completion_tokens"])

    seconds = concurrently(one, clients)  # before sum(counts): the threads fill counts
    return sum(counts) / seconds


def ttft_under_load(base: str, rounds: int) -> tuple[float, float]:
    """Median TTFT of the short request idle, and while a 512-token generation runs."""
    body = {"prompt": SHORT, "max_tokens": 8, **PARAMS}
    idle = statistics.median(first_text_seconds(base, body) for _ in range(rounds))
    loaded = []
    for _ in range(rounds):
        long_run = threading.Thread(target=post, args=(base, {"prompt": PROMPT, "max_tokens": 512, **PARAMS}))
        long_run.start()
        time.sleep(0.5)  # the long generation is decoding
        loaded.append(first_text_seconds(base, body))
        long_run.join()
    return idle, statistics.median(loaded)


def mqtt_clients(client: MqttClient, topics: tuple[str, str], clients: int, tokens: int) -> tuple[float, float]:
    """Aggregate tok/s and p95 TTFT of ``clients`` streamed MQTT requests sent at once, alternating between the
    fleet topic and the device topic."""
    ttfts: list[float] = []
    counts: list[int] = []

    def kind(reply: str, *types: str) -> Callable[[Any], bool]:  # a predicate for MqttClient.wait_for
        return lambda m: m.topic == reply and json.loads(m.payload)["type"] in types

    def one(i: int) -> None:
        reply = f"bench/mqtt/{uuid.uuid4().hex}"
        client.subscribe(reply)
        started = time.perf_counter()
        client.publish(topics[i % 2], {"id": f"m{i}", "prompt": f"{PROMPT} ({i})", "max_tokens": tokens,
                                       "stream": True, **PARAMS}, response_topic=reply, correlation=b"m")
        client.wait_for(kind(reply, "chunk", "result", "error"), timeout=600)
        ttfts.append(time.perf_counter() - started)
        (final,) = client.wait_for(kind(reply, "result", "error"), timeout=600)
        counts.append(json.loads(final.payload).get("usage", {}).get("completion_tokens", 0))

    seconds = concurrently(one, clients)  # before sum(counts): the threads fill counts
    return sum(counts) / seconds, sorted(ttfts)[math.ceil(0.95 * len(ttfts)) - 1]


def determinism(model: Path, prompts: int, threads: int, flash_attention: bool) -> tuple[int, list[str]]:
    from appliance.backends.base import EngineSettings, GenerationTask
    from appliance.backends.llama_cpp import LlamaCppBackend
    from appliance.catalog.entry import ModelEntry
    from appliance.protocol import Completion, SamplingParams

    entry = ModelEntry(id="m", path=model, sha256=None, backend="llama_cpp", commercial_use=True)
    texts = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(prompts)]
    params = SamplingParams(max_tokens=48, temperature=0)
    alone: list[str] = []
    alone_settings = EngineSettings(threads=threads, context_size=1024, batch_size=256, flash_attention=flash_attention)
    with LlamaCppBackend(alone_settings) as serial:
        serial.load(entry)
        for text in texts:
            events = serial.generate(GenerationTask(prompt=text, messages=None, params=params), lambda: False)
            alone.append(next(e for e in events if isinstance(e, Completion)).text)
    batched: dict[int, str] = {}
    with LlamaCppBackend(replace(alone_settings, parallel=4)) as b:
        b.load(entry)
        batch = b.batch()
        assert batch is not None
        waiting = list(enumerate(texts))
        while waiting or batch.keys:
            while waiting and len(batch.keys) < 4:
                key, text = waiting.pop(0)
                batch.join(key, GenerationTask(prompt=text, messages=None, params=params))
            for event in batch.step():
                if isinstance(event.event, Completion):
                    batched[event.key] = event.event.text
    differ = [i for i, text in enumerate(alone) if batched.get(i) != text]
    where = []
    for i in differ[:5]:
        a, b2 = alone[i], batched.get(i, "")
        at = next((n for n, (x, y) in enumerate(zip(a, b2, strict=False)) if x != y), min(len(a), len(b2)))
        where.append(f"prompt {i}: from character {at} ({a[at:at + 20]!r} vs {b2[at:at + 20]!r})")
    return prompts - len(differ), where


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


@dataclass(frozen=True)
class ServerFigures:
    single: float  # tok/s of one client
    four: float  # aggregate tok/s of 4 clients at once
    memory: list[ProcessMemory]  # after those runs


def server_aggregate(binary: Path, model: Path, threads: int, context: int, tokens: int) -> ServerFigures:
    """One client's and 4 clients' aggregate tok/s against ``llama-server -np 4`` (``-c`` is the total over the 4
    slots, so each slot gets ``context`` like the appliance's), and its memory after those runs. Its own 4-to-1
    ratio says how much batching this machine and model allow at all."""
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "-t", str(threads), "-c", str(context * 4), "-np", "4",
                             "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        aggregate(base, 4, tokens)  # warm-up
        single = aggregate(base, 1, tokens)
        four = aggregate(base, 4, tokens)
        return ServerFigures(single, four, tree_memory(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--llama-server", type=Path, default=None)
    parser.add_argument("--flash-attention", action="store_true",
                        help="worker.flash_attention on (llama-server's default), for the appliance and the "
                             "determinism run")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window after the runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="appliance-bench-batch-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o777)
        model = default_model.ensure(workdir / "models")
        catalog = workdir / "catalog.toml"
        catalog.write_text(f'[[models]]\nid = "{default_model.MODEL_ID}"\nfile = "{model}"\n'
                           f'sha256 = "{default_model.SHA256}"\n')
        broker = Mosquitto(workdir / "broker", free_port(), persistence=False)
        broker.start()

        def start(env: dict[str, str]) -> Appliance:
            return new_appliance(workdir, broker.port, catalog, default_model.MODEL_ID, {
                "worker": {"threads": args.threads, "context_size": args.context, "parallel": 4, "max_queue": 8,
                           "request_timeout": 600, "flash_attention": args.flash_attention},
                "logging": {"level": "warning"}}, env).start(timeout=180)

        app = start({})
        client = MqttClient(broker.host, broker.port)
        try:
            base = app.http_url
            aggregate(base, 1, args.tokens)  # warm-up
            single = statistics.median(aggregate(base, 1, args.tokens) for _ in range(args.rounds))
            four = statistics.median(aggregate(base, 4, args.tokens) for _ in range(args.rounds))
            idle, loaded = ttft_under_load(base, args.rounds)
            fleet_topic = f"{app.config.get('mqtt', {}).get('topic_prefix', 'appliance')}/fleet/generate"
            mqtt_rate, mqtt_p95 = mqtt_clients(client, (fleet_topic, app.topic("generate")), 8, args.tokens)
            assert app.proc is not None
            app_memory = tree_memory(app.proc.pid)
            idle_cpu = idle_cpu_percent(app.proc.pid, args.idle_seconds)
        finally:
            client.close()
            app.stop()
        try:
            board = shared_board.measure(start, aggregate, args.threads, args.tokens, args.rounds)
        finally:
            broker.stop()
        same, where = determinism(model, args.prompts, args.threads, args.flash_attention)
        server = (server_aggregate(args.llama_server, model, args.threads, args.context, args.tokens)
                  if args.llama_server else None)
    lines = [
        "## Continuous batching (issue 18)", "",
        f"`python -m bench.batching{' --flash-attention' if args.flash_attention else ''}`: {model.name}, "
        f"{args.threads} threads, `worker.parallel = 4`, "
        f"`worker.flash_attention = {str(args.flash_attention).lower()}`, context "
        f"{args.context} per slot, {args.tokens}-token generations, medians of {args.rounds} rounds, over HTTP.", "",
        "| what | figure | target |", "|---|---|---|",
        f"| single client | {single:.1f} tok/s | |",
        f"| 4 clients at once, aggregate | {four:.1f} tok/s = {four / single:.2f}x single | >= 1.5x |",
        "| llama-server -np 4, aggregate | "
        + (f"{server.four:.1f} tok/s = {server.four / server.single:.2f}x its single client ({server.single:.1f} "
           f"tok/s); appliance {four / server.four:.2f}x | >= 1.0x |" if server else
           "not measured (pass --llama-server PATH, built from the vendored llama.cpp) | >= 1.0x |"),
        f"| TTFT of a short request, idle | {idle * 1000:.0f} ms | |",
        f"| TTFT of a short request while a 512-token generation runs | {loaded * 1000:.0f} ms = "
        f"{loaded / idle:.2f}x idle | <= 2x |",
        f"| 8 MQTT clients (fleet + device topics), aggregate | {mqtt_rate:.1f} tok/s | reported |",
        f"| 8 MQTT clients, p95 TTFT | {mqtt_p95 * 1000:.0f} ms | reported |",
        *memory_rows(app_memory, server.memory if server else None),
        f"| idle CPU over {args.idle_seconds:.0f} s after the runs, service + all children | "
        f"{idle_cpu:.2f} % of one core | <= 1 % |",
        *shared_board.rows(board, args.threads),
        f"| temperature 0, alone vs batched 4 at a time | {same} of {args.prompts} identical | reported |", "",
    ]
    if where:
        lines += ["First differences (batched kernels round differently):", "", *(f"- {w}" for w in where), ""]
    text = "\n".join(lines)
    replace_section(args.out, "batching", text)
    print(text)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
