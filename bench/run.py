"""`make bench`: the appliance against raw llama-cpp-python and against llama-cpp-python's own server.

One run, one model (the embedded default, SmolLM2-135M-Instruct Q4_1), the same prompt, parameters and thread count on
every path. The paths are measured in interleaved rounds (raw, MQTT, HTTP, peer, raw, ...) so that clock or
thermal drift affects them alike; medians are reported as ratios to raw llama-cpp-python measured in the same run.

- generation speed: completion tokens / wall time of a ``max_tokens=N`` request (temperature 0, same text on
  every path), seen by the client;
- per-request overhead: wall time of a ``max_tokens=1`` round trip minus raw's time for the same call.

A second appliance, started with libgomp's default spin count, shows in the same rounds what the appliance's
``GOMP_SPINCOUNT=300`` costs on an idle board (bench/shared_board.py measures what it wins on a shared one).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import llama_cpp

from appliance import __version__
from appliance.catalog import default_model
from appliance.transports.broker import Mosquitto, free_port
from bench import shared_board
from bench.report_sections import replace_section
from tests.support.harness import MqttClient, new_appliance

PROMPT = "The history of the Raspberry Pi began in 2006, when"
# every sampling parameter explicit: llama_cpp.server's own defaults differ (repeat_penalty 1.1)
PARAMS = {"temperature": 0, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0}
TARGETS = {"ratio": 0.98, "overhead_ms": 5.0}  # from the issue; reported, never asserted
SPINNING = "appliance via HTTP, libgomp's default spinning"


class KeepAlive:
    """One persistent HTTP/1.1 connection, as a real client library would keep (the same for both servers)."""

    def __init__(self, base_url: str) -> None:
        parsed = urllib.parse.urlparse(base_url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)

    def post(self, path: str, body: dict) -> dict:
        try:
            self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.conn.close()  # the server closed an idle keep-alive connection (uvicorn does after 5 s)
            self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {data}")
        return data


class MqttRequester:
    """Publishes requests with Response Topic + Correlation Data and waits for the final reply; the reply topic is
    subscribed once, so the timing is the appliance's round trip, not the client's set-up."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.client = MqttClient(host, port)
        self.topic = topic
        self.reply_topic = f"bench/{uuid.uuid4().hex}"
        self.client.subscribe(self.reply_topic)

    def request(self, body: dict) -> dict:
        correlation = uuid.uuid4().bytes
        self.client.publish(self.topic, body, response_topic=self.reply_topic, correlation=correlation)
        return self.client.replies(self.reply_topic, correlation=correlation, timeout=600)[-1]

    def close(self) -> None:
        self.client.close()


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


class Paths:
    """Each path answers ``call(max_tokens) -> (seconds, completion_tokens, text)``."""

    def __init__(self, model: Path, threads: int, context: int, batch: int, workdir: Path) -> None:
        # whatever has started is stopped if a later part fails to start (a peer server that never answered left
        # two appliances running before)
        self._started = contextlib.ExitStack()
        try:
            self._start(model, threads, context, batch, workdir)
        except BaseException:
            self.close()
            raise

    def _start(self, model: Path, threads: int, context: int, batch: int, workdir: Path) -> None:
        on_close = self._started.callback
        self.raw_llm = llama_cpp.Llama(str(model), n_ctx=context, n_batch=batch, n_threads=threads, verbose=False)
        on_close(self.raw_llm.close)
        self.broker = Mosquitto(workdir / "broker", free_port(), persistence=False)
        on_close(self.broker.stop)
        self.broker.start()
        catalog = workdir / "catalog.toml"
        catalog.write_text(f'[[models]]\nid = "{default_model.MODEL_ID}"\nfile = "{model}"\n'
                           f'sha256 = "{default_model.SHA256}"\n')
        config = {"worker": {"threads": threads, "context_size": context, "batch_size": batch, "max_queue": 4,
                             "request_timeout": 600}, "logging": {"level": "warning"}}
        self.app = new_appliance(workdir, self.broker.port, catalog, default_model.MODEL_ID, config)
        on_close(self.app.stop)
        self.app.start(timeout=180)
        self.mqtt = MqttRequester(self.broker.host, self.broker.port, self.app.topic("generate"))
        on_close(self.mqtt.close)
        self.app_http = KeepAlive(self.app.http_url)
        # the same appliance with libgomp's own spin count put back (the service's environment wins over the
        # GOMP_SPINCOUNT=300 it gives its children): what that setting costs on an idle board, in the same run
        self.spinning = new_appliance(workdir, self.broker.port, catalog, default_model.MODEL_ID, config,
                                      shared_board.LIBGOMP_DEFAULT)
        on_close(self.spinning.stop)
        self.spinning.start(timeout=180)
        self.spinning_http = KeepAlive(self.spinning.http_url)
        self.peer_port = free_port()
        self.peer = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--n_ctx", str(context), "--n_batch", str(batch),
             "--port", str(self.peer_port), "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        on_close(self._stop_peer)
        _wait_http(f"http://127.0.0.1:{self.peer_port}/v1/models")
        self.peer_http = KeepAlive(f"http://127.0.0.1:{self.peer_port}")

    def _stop_peer(self) -> None:
        self.peer.terminate()
        self.peer.wait(30)

    def raw(self, n: int):
        t = time.perf_counter()
        out = self.raw_llm.create_completion(PROMPT, max_tokens=n, **PARAMS)
        return time.perf_counter() - t, out["usage"]["completion_tokens"], out["choices"][0]["text"]

    def mqtt_path(self, n: int):
        t = time.perf_counter()
        final = self.mqtt.request({"prompt": PROMPT, "max_tokens": n, **PARAMS})
        return time.perf_counter() - t, final["usage"]["completion_tokens"], final["text"]

    @staticmethod
    def _completion(conn: KeepAlive, n: int):
        t = time.perf_counter()
        out = conn.post("/v1/completions", {"prompt": PROMPT, "max_tokens": n, **PARAMS})
        return time.perf_counter() - t, out["usage"]["completion_tokens"], out["choices"][0]["text"]

    def http_path(self, n: int):
        return self._completion(self.app_http, n)

    def spinning_path(self, n: int):
        return self._completion(self.spinning_http, n)

    def peer_path(self, n: int):
        return self._completion(self.peer_http, n)

    def close(self) -> None:
        """Stop what started, last first (idempotent)."""
        self._started.close()


def measure(paths: Paths, tokens: int, rounds: int, overhead_calls: int) -> dict:
    """Rounds of every path; each round's figures are divided by raw's in the same round (paired), so slow drift of
    a shared machine cancels, and the order of paths rotates from round to round."""
    named = {"raw llama-cpp-python": paths.raw, "appliance via MQTT": paths.mqtt_path,
             "appliance via HTTP": paths.http_path, SPINNING: paths.spinning_path,
             "llama_cpp.server (peer)": paths.peer_path}
    speed: dict[str, list[float]] = {k: [] for k in named}
    one: dict[str, list[float]] = {k: [] for k in named}
    texts: dict[str, str] = {}
    for fn in named.values():  # warm-up: page in the model, fill caches
        fn(tokens)
        fn(1)
    order = list(named)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn = named[name]
            time.sleep(0.3)  # let the previous path's llama.cpp threads stop spinning: the cores are shared
            seconds, completion, text = fn(tokens)
            speed[name].append(completion / seconds)
            texts[name] = text
            fn(1)  # untimed: after the long generation the prompt's last token is evaluated again, on every path
            one[name].append(statistics.median(fn(1)[0] for _ in range(overhead_calls)) * 1000)
    raw = "raw llama-cpp-python"
    ratios = {k: [s / r for s, r in zip(v, speed[raw], strict=True)] for k, v in speed.items()}
    overheads = {k: [o - r for o, r in zip(v, one[raw], strict=True)] for k, v in one.items()}
    return {"speed": {k: statistics.median(v) for k, v in speed.items()},
            "ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_range": {k: (min(v), max(v)) for k, v in ratios.items()},
            "one_token_ms": {k: statistics.median(v) for k, v in one.items()},
            "overhead_ms": {k: statistics.median(v) for k, v in overheads.items()},
            "texts": texts, "tokens": tokens, "rounds": rounds}


def report(result: dict, args: argparse.Namespace, model: Path) -> str:
    peer = "llama_cpp.server (peer)"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    same = len(set(result["texts"].values())) == 1
    lines = [
        "# Benchmarks", "",
        f"Generated by `make bench` (`python -m bench.run --tokens {args.tokens} --rounds {args.rounds} "
        f"--overhead-calls {args.overhead_calls}`) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        "Re-run it to refresh this section; figures are only comparable within one run.", "",
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.machine()}, Python {platform.python_version()}",
        f"- model: {model.name} ({default_model.DESCRIPTION}), llama-cpp-python {llama_cpp.__version__}, "
        f"appliance {__version__}",
        f"- every path: {args.threads} threads, context {args.context}, batch {args.batch}, temperature 0, "
        f"repeat_penalty 1.0, a {len(PROMPT)}-character prompt; {args.tokens}-token generations; "
        f"{args.rounds} rounds with the order of paths rotating; in each round every path's figures are taken "
        f"relative to raw's in that round, and the table shows medians over rounds",
        "- all paths produced the same text: " + ("yes" if same else "NO: " + json.dumps(result["texts"])), "",
        "| path | generation tok/s | ratio to raw (min-max over rounds) | 1-token round trip (ms) "
        "| overhead vs raw (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, speed in result["speed"].items():
        low, high = result["ratio_range"][name]
        lines.append(f"| {name} | {speed:.1f} | {result['ratio'][name]:.3f} ({low:.3f}-{high:.3f}) "
                     f"| {result['one_token_ms'][name]:.1f} | {result['overhead_ms'][name]:+.1f} |")
    lines += ["", "The min-max column is the spread of the per-round ratios: it shows how much a single "
              "measurement moves on this machine, so read differences smaller than that spread as noise.", "",
              "The appliance starts its children with `GOMP_SPINCOUNT=300`: a llama.cpp thread waiting at one of "
              "the graph's OpenMP barriers sleeps almost at once instead of spinning 300000 times. On a board whose "
              "cores are shared (mosquitto, the service, a sensor app) that wins far more than it costs (the "
              "shared-board rows of the batching section below); on an idle board it costs what the row "
              f"\"{SPINNING}\" shows against \"appliance via HTTP\".", "",
              "Targets (issue: core appliance): generation >= 0.98x raw on both paths, ahead of the peer "
              "server, per-request overhead <= 5 ms.", ""]
    for name in ("appliance via MQTT", "appliance via HTTP"):
        ratio, overhead = result["ratio"][name], result["overhead_ms"][name]
        ahead = ratio > result["ratio"][peer]
        lines.append(f"- {name}: ratio {ratio:.3f} ({'met' if ratio >= TARGETS['ratio'] else 'NOT met'}); "
                     f"overhead {overhead:.1f} ms ({'met' if overhead <= TARGETS['overhead_ms'] else 'NOT met'}); "
                     f"{'ahead of' if ahead else 'behind'} the peer server "
                     f"({ratio:.3f} vs {result['ratio'][peer]:.3f})")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--overhead-calls", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o777)
        model = default_model.ensure(workdir / "models")
        paths = Paths(model, args.threads, args.context, args.batch, workdir)
        try:
            result = measure(paths, args.tokens, args.rounds, args.overhead_calls)
        finally:
            paths.close()
    text = report(result, args, model)
    replace_section(args.out, "run", text)  # the page's other sections and its prose stay as they are
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
