"""`make bench`, issue 18: continuous batching (``worker.parallel = 4``) on the embedded default model.

One appliance with four slots, over HTTP, the sampling parameters of bench/run.py:

- aggregate tok/s of 4 concurrent clients against the same appliance's single-client rate (target >= 1.5x), and
  against C++ ``llama-server -np 4`` when ``--llama-server PATH`` names one built from llama-cpp-python's vendored
  llama.cpp (target >= 1.0x; ``scripts/build-llama-server`` builds and caches one, ``make bench`` passes it). Both
  servers run at once and their rounds alternate (bench/llama_server.py); every request has a prompt of its own that
  runs to ``--tokens``, and the table counts any that did not. A second appliance with libgomp's default spin count
  (``GOMP_SPINCOUNT=300000``; the shipped 300 trades some speed on idle cores for a shared board's, see below) takes
  its turn in the same rounds, so that the trade is seen apart from the rest;
- memory: RSS of the appliance (the service, its worker and any other children) after the runs against
  ``llama-server``'s (same model, context, ``-np 4``, threads) after the same kind of runs, as a ratio (target
  <= 1.15x);
- idle CPU of the whole appliance (service and all its children) over ``--idle-seconds`` (60) once the runs are
  over, in percent of one core (target <= 1 %);
- TTFT of a short request (a 16-token prompt of its own, streamed) while a 512-token generation runs, against its
  TTFT on the idle device (target <= 2x);
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
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.catalog import default_model, sha256_file
from appliance.transports.broker import Mosquitto, free_port
from bench import shared_board
from bench.llama_server import LlamaServer
from bench.process_tree import ProcessMemory, idle_cpu_percent, memory_rows, tree_memory
from bench.report_sections import replace_section
from tests.support.harness import Appliance, MqttClient, new_appliance

SPINNING = "appliance with libgomp's default spin count"
PARAMS = {"temperature": 0, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0}
_REQUESTS = itertools.count(1)  # every request's prompt its own: a repeated one is sampled from kept logits


def running_prompt(n: int) -> str:
    """Request ``n``'s prompt for the throughput rounds: one that the default model continues for any number of
    tokens. A prose prompt made unique ("... when (n)") ends after 45 tokens for about one number in seven, and a
    4-client round with one short answer runs its batch part-empty for the rest: the aggregate swung between 130
    and 185 tok/s by which numbers a round drew (measured: 7 of 50 such prompts stopped early, none of 50 of
    these)."""
    return f"Counting from {n}: {n}, {n + 1}, {n + 2},"


def short_prompt(n: int) -> str:
    """Request ``n``'s short prompt (16 tokens on SmolLM2), different from its first token on: nothing of it is in
    a sequence's kept cells, so its TTFT is a 16-token evaluation, idle and under load alike."""
    return f"Note {n}: the Raspberry Pi is a small and cheap computer that"


@dataclass
class Tally:
    """Requests of the throughput rounds, and those that ended before ``max_tokens`` (a round with one short
    answer measures a part-empty batch: the table says how many there were)."""

    sent: int = 0
    ended_early: int = 0

    def count(self, completion_tokens: int, wanted: int) -> None:
        self.sent += 1
        self.ended_early += completion_tokens < wanted


TALLY = Tally()


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


def aggregate(base: str, clients: int, tokens: int) -> float:
    """Completion tokens per second of ``clients`` requests sent at once, each with a prompt no request had before
    that runs to ``tokens`` (counted in TALLY)."""
    counts: list[int] = []

    def one(i: int) -> None:
        out = post(base, {"prompt": running_prompt(next(_REQUESTS)), "max_tokens": tokens, **PARAMS})
        counts.append(out["usage"]["completion_tokens"])
        TALLY.count(out["usage"]["completion_tokens"], tokens)

    seconds = concurrently(one, clients)  # before sum(counts): the threads fill counts
    return sum(counts) / seconds


def ratios(mine: list[float], theirs: list[float]) -> list[float]:
    return [a / b for a, b in zip(mine, theirs, strict=True)]


@dataclass
class Rates:
    """One server's single-client and 4-client tok/s, round by round."""

    single: list[float] = field(default_factory=list)
    four: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return ratios(self.four, self.single)


def alternating_rounds(bases: dict[str, str], tokens: int, rounds: int) -> dict[str, Rates]:
    """Each round: one client, then four, against each server in turn (a warm-up round first, not counted)."""
    rates = {name: Rates() for name in bases}
    for base in bases.values():
        aggregate(base, 4, tokens)
    for _ in range(rounds):
        for name, base in bases.items():
            rates[name].single.append(aggregate(base, 1, tokens))
            rates[name].four.append(aggregate(base, 4, tokens))
    return rates


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def ttft_under_load(base: str, rounds: int) -> tuple[float, float]:
    """Median TTFT of the short request idle, and while a 512-token generation runs."""
    def body() -> dict[str, Any]:
        return {"prompt": short_prompt(next(_REQUESTS)), "max_tokens": 8, **PARAMS}

    idle = statistics.median(first_text_seconds(base, body()) for _ in range(rounds))
    loaded = []
    for _ in range(rounds):
        long_run = threading.Thread(target=post, args=(base, {"prompt": running_prompt(next(_REQUESTS)),
                                                              "max_tokens": 512, **PARAMS}))
        long_run.start()
        time.sleep(0.5)  # the long generation is decoding
        loaded.append(first_text_seconds(base, body()))
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
        client.publish(topics[i % 2], {"id": f"m{i}", "prompt": running_prompt(next(_REQUESTS)), "max_tokens": tokens,
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
    parser.add_argument("--model", type=Path, default=None,
                        help="another GGUF file (default: the embedded default model); its section of --out is "
                             "batching-<file stem>, beside the default model's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="appliance-bench-batch-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o777)
        if args.model is None:
            model, model_id, digest = default_model.ensure(workdir / "models"), default_model.MODEL_ID, \
                default_model.SHA256
        else:
            model, model_id, digest = args.model.resolve(), args.model.stem.lower(), sha256_file(args.model)
        catalog = workdir / "catalog.toml"
        catalog.write_text(f'[[models]]\nid = "{model_id}"\nfile = "{model}"\nsha256 = "{digest}"\n')
        broker = Mosquitto(workdir / "broker", free_port(), persistence=False)
        broker.start()

        def start(env: dict[str, str]) -> Appliance:
            return new_appliance(workdir, broker.port, catalog, model_id, {
                "worker": {"threads": args.threads, "context_size": args.context, "parallel": 4, "max_queue": 8,
                           "request_timeout": 600, "flash_attention": args.flash_attention},
                "logging": {"level": "warning"}}, env).start(timeout=180)

        app = start({})
        client = MqttClient(broker.host, broker.port)
        server_memory: list[ProcessMemory] | None = None
        try:
            base = app.http_url
            with contextlib.ExitStack() as stack:
                spinning = start(shared_board.LIBGOMP_DEFAULT)
                stack.callback(spinning.stop)
                bases = {"appliance": base, SPINNING: spinning.http_url}
                if args.llama_server:
                    server = stack.enter_context(LlamaServer(args.llama_server, model, args.threads, args.context,
                                                             workdir))
                    bases["llama-server"] = server.base
                rates = alternating_rounds(bases, args.tokens, args.rounds)
                if args.llama_server:
                    server_memory = tree_memory(server.pid)
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
    mine, spun = rates["appliance"], rates[SPINNING]
    theirs = rates.get("llama-server")
    lines = [
        f"## Continuous batching (issue 18){'' if args.model is None else ': ' + model.name}", "",
        f"`python -m bench.batching{' --flash-attention' if args.flash_attention else ''}"
        f"{'' if args.model is None else ' --model ' + model.name}`: {model.name}, "
        f"{args.threads} threads, `worker.parallel = 4`, "
        f"`worker.flash_attention = {str(args.flash_attention).lower()}`, context "
        f"{args.context} per slot, {args.tokens}-token generations, over HTTP. Throughput: {args.rounds} rounds, "
        "each one client then four against the appliance and then against llama-server (both running, each on its "
        "own copy of the model file); ratios are taken within a round, the table shows their median "
        "(min-max over rounds).", "",
        "| what | figure | target |", "|---|---|---|",
        f"| single client | {statistics.median(mine.single):.1f} tok/s | |",
        f"| 4 clients at once, aggregate | {statistics.median(mine.four):.1f} tok/s; "
        f"{median_range(mine.ratios())} single | >= 1.5x |",
        "| llama-server -np 4, aggregate | "
        + (f"{statistics.median(theirs.four):.1f} tok/s; {median_range(theirs.ratios())} its single client "
           f"({statistics.median(theirs.single):.1f} tok/s); appliance "
           f"{median_range(ratios(mine.four, theirs.four))} | >= 1.0x |"
           if theirs else "not measured (pass --llama-server PATH, built from the vendored llama.cpp) | >= 1.0x |"),
        f"| {SPINNING} (a second appliance in the same rounds), single client / 4 clients | "
        f"{statistics.median(spun.single):.1f} / {statistics.median(spun.four):.1f} tok/s; 4 clients "
        f"{median_range(spun.ratios())} single"
        + (f"; against llama-server: single {median_range(ratios(spun.single, theirs.single))}, 4 clients "
           f"{median_range(ratios(spun.four, theirs.four))}" if theirs else "") + " | reported |",
        f"| requests of the throughput rounds that ended before {args.tokens} tokens | {TALLY.ended_early} of "
        f"{TALLY.sent} | 0 |",
        f"| TTFT of a short request (16 tokens, none of them cached), idle | {idle * 1000:.0f} ms | |",
        f"| TTFT of a short request while a 512-token generation runs | {loaded * 1000:.0f} ms = "
        f"{loaded / idle:.2f}x idle | <= 2x |",
        f"| 8 MQTT clients (fleet + device topics), aggregate | {mqtt_rate:.1f} tok/s | reported |",
        f"| 8 MQTT clients, p95 TTFT | {mqtt_p95 * 1000:.0f} ms | reported |",
        *memory_rows(app_memory, server_memory),
        f"| idle CPU over {args.idle_seconds:.0f} s after the runs, service + all children | "
        f"{idle_cpu:.2f} % of one core | <= 1 % |",
        *shared_board.rows(board, args.threads),
        f"| temperature 0, alone vs batched 4 at a time | {same} of {args.prompts} identical | reported |", "",
    ]
    if where:
        lines += ["First differences (batched kernels round differently):", "", *(f"- {w}" for w in where), ""]
    text = "\n".join(lines)
    replace_section(args.out, "batching" if args.model is None else f"batching-{model_id}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
