"""`make soak`: 30 minutes of mixed MQTT and HTTP traffic with cancels and disconnects (issue 10).

    .venv/bin/python -m bench.soak --minutes 30 --out docs/reliability.md

Serves the embedded default model (SmolLM2-135M-Instruct, as a device does) on a private mosquitto and keeps six
clients busy until the time is up:

- MQTT v5 and MQTT 3.1.1 requesters (short answers, some streamed),
- an MQTT client that starts a long streamed answer and cancels it after the first chunk,
- an OpenAI client (chat, streamed and not) and an Ollama client (`/api/chat`, NDJSON),
- an HTTP client that starts a stream and hangs up after the first bytes,
- a prober on `/healthz` and `/metrics` that also samples the resident memory of the service and its worker.

Every request that expects an answer must get exactly one final reply; the report counts answers, errors by code,
lost and duplicated replies, and the RSS of both processes after a warm-up request that fills the context window
and at the end, with a sample every minute between. Not in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from appliance import __version__
from appliance.catalog import default_model
from appliance.transports.broker import Mosquitto
from bench.private_appliance import private_appliance
from bench.report_sections import replace_section
from tests.support.harness import Appliance, MqttClient

PROMPTS = ["Name three colours.", "¿Cuál es la capital de España?", "用一句话介绍太阳。", "What is 7 times 8?",
           "Say hello to the sensor network.", "Dame tres frutas."]
REPLY_BOUND = 300  # seconds: a request not answered by then is counted lost


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: Counter = field(default_factory=Counter)  # per client kind
    codes: Counter = field(default_factory=Counter)  # "ok" or an error code
    lost: list[str] = field(default_factory=list)
    twice: int = 0
    aborted: int = 0  # HTTP streams the client hung up on (no answer expected)
    probes: list[float] = field(default_factory=list)  # seconds per /healthz
    memory: list[tuple[float, float, float]] = field(default_factory=list)  # (minute, service MiB, worker MiB)

    def answer(self, kind: str, code: str) -> None:
        with self.lock:
            self.answered[kind] += 1
            self.codes[code] += 1


class Soak:
    def __init__(self, app: Appliance, broker: Mosquitto, until: float, rng: random.Random) -> None:
        self.app, self.broker, self.until, self.rng = app, broker, until, rng
        self.tally = Tally()
        self.port = app.config["http"]["port"]

    def running(self) -> bool:
        return time.monotonic() < self.until

    # -- MQTT ------------------------------------------------------------------------------------------------------

    def mqtt_requester(self, protocol: str) -> None:
        client = MqttClient(self.broker.host, self.broker.port, protocol=protocol)
        try:
            while self.running():
                body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(4, 24),
                        "stream": self.rng.random() < 0.3, "id": uuid.uuid4().hex[:12]}
                kind = f"mqtt {protocol}"
                try:
                    replies = client.request(self.app.topic("generate"), body, timeout=REPLY_BOUND)
                except TimeoutError:
                    self.tally.lost.append(f"{kind} {body['id']}")
                    continue
                finals = [r for r in replies if r["type"] != "chunk"]
                self.tally.twice += len(finals) - 1
                self.tally.answer(kind, _code(finals[-1]))
                client.forget()
        finally:
            client.close()

    def mqtt_canceller(self) -> None:
        client = MqttClient(self.broker.host, self.broker.port)
        try:
            while self.running():
                rid, topic = uuid.uuid4().hex[:12], f"soak/cancel/{uuid.uuid4().hex[:8]}"
                client.subscribe(topic)
                client.publish(self.app.topic("generate"), {"id": rid, "prompt": self.rng.choice(PROMPTS),
                                                            "max_tokens": 400, "stream": True},
                               response_topic=topic, correlation=rid.encode())
                try:
                    client.wait_for(lambda m, t=topic: m.topic == t, timeout=REPLY_BOUND)  # the first chunk
                    client.cancel(self.app.topic("cancel"), rid, topic)
                    replies = client.replies(topic, correlation=rid.encode(), timeout=REPLY_BOUND)
                except TimeoutError:
                    self.tally.lost.append(f"cancelled {rid}")
                    continue
                finals = [r for r in replies if r["type"] != "chunk"]
                self.tally.twice += len(finals) - 1
                self.tally.answer("mqtt cancel", _code(finals[-1]))
                client.forget()
        finally:
            client.close()

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def http_client(self, route: str) -> None:
        while self.running():
            messages = [{"role": "user", "content": self.rng.choice(PROMPTS)}]
            stream = self.rng.random() < 0.5 if route == "/v1/chat/completions" else True
            body = ({"messages": messages, "max_tokens": self.rng.randint(4, 24), "stream": stream}
                    if route.startswith("/v1") else
                    {"model": default_model.MODEL_ID, "messages": messages,
                     "options": {"num_predict": self.rng.randint(4, 24)}})
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REPLY_BOUND)
            try:
                conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.tally.lost.append(f"{route}: {type(exc).__name__}")
                continue
            finally:
                conn.close()
            self.tally.answer(f"http {route}", _http_code(response.status, data))

    def http_disconnector(self) -> None:
        while self.running():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REPLY_BOUND)
            try:
                conn.request("POST", "/v1/completions", json.dumps({"prompt": self.rng.choice(PROMPTS),
                                                                    "max_tokens": 300, "stream": True}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read(64)  # the first event, then hang up mid-answer
                with self.tally.lock:
                    self.tally.aborted += 1
            except (OSError, http.client.HTTPException) as exc:
                self.tally.lost.append(f"disconnector: {type(exc).__name__}")
            finally:
                conn.close()
            time.sleep(self.rng.uniform(1, 5))

    # -- health and memory -------------------------------------------------------------------------------------------

    def rss_mib(self) -> tuple[float, float]:
        service = psutil.Process(self.app.proc.pid)
        worker = psutil.Process(self.app.status()["worker_pid"])
        return service.memory_info().rss / 2**20, worker.memory_info().rss / 2**20

    def prober(self) -> None:
        began = time.monotonic()
        next_sample = began
        while self.running():
            started = time.monotonic()
            if started >= next_sample:
                self.tally.memory.append(((started - began) / 60, *self.rss_mib()))
                next_sample += 60
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                self.tally.probes.append(time.monotonic() - started)
                conn.request("GET", "/metrics")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException) as exc:
                self.tally.lost.append(f"probe: {type(exc).__name__}")
            finally:
                conn.close()
            time.sleep(5)


def warm_up(app: Appliance) -> None:
    """One request that fills the context window: llama.cpp allocates the KV cache at load, but its pages become
    resident only as positions are written, so without this the first long answers of the soak would read as growth
    (up to ~47 MiB for SmolLM2's 30 layers at 2048 positions). What grows after it is what the soak adds."""
    story = " ".join(PROMPTS * 24)  # about 1,350 tokens
    conn = http.client.HTTPConnection("127.0.0.1", app.config["http"]["port"], timeout=REPLY_BOUND)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": story, "max_tokens": 500}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"the warm-up request failed: {body}")
    print(f"soak: warm-up filled {body['usage']['total_tokens']} positions of the context", flush=True)


def _code(final: dict) -> str:
    return final["error"]["code"] if final["type"] == "error" else "ok"


def _http_code(status: int, data: bytes) -> str:
    if status != 200:
        try:
            return json.loads(data).get("error", {}).get("code", f"http {status}")
        except ValueError:
            return f"http {status}"
    return "internal" if b'"internal"' in data else "ok"


def report(soak: Soak, minutes: float, start: tuple[float, float], end: tuple[float, float]) -> str:
    t = soak.tally
    answered = sum(t.answered.values())
    growth = [(e - s) / s * 100 for s, e in zip(start, end, strict=True)]
    probes = sorted(t.probes)
    p99 = probes[int(len(probes) * 0.99) - 1] * 1000 if probes else float("nan")
    return "\n".join([
        f"Last run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, appliance {__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores, model {default_model.MODEL_ID}; `python -m bench.soak --minutes {minutes:g}`.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| requests answered | {answered} ({', '.join(f'{k} {n}' for k, n in sorted(t.answered.items()))}) |",
        f"| answers by outcome | {', '.join(f'`{c}` {n}' for c, n in t.codes.most_common())} |",
        f"| HTTP streams the client hung up on | {t.aborted} |",
        f"| lost (no final reply within {REPLY_BOUND} s) | {len(t.lost)} |",
        f"| answered twice | {t.twice} |",
        f"| `/healthz` under load, p99 of {len(probes)} probes | {p99:.0f} ms |",
        f"| service RSS, after the warm-up → end | {start[0]:.0f} → {end[0]:.0f} MiB ({growth[0]:+.1f} %) |",
        f"| worker RSS, after the warm-up → end | {start[1]:.0f} → {end[1]:.0f} MiB ({growth[1]:+.1f} %) |",
        "",
        "RSS every minute (minute: service / worker MiB): "
        + ", ".join(f"{m:.0f}: {a:.0f} / {b:.0f}" for m, a, b in t.memory[::max(1, len(t.memory) // 12)]) + ".",
    ] + ([f"\nLost: {', '.join(t.lost[:20])}"] if t.lost else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the figures into this report's `soak` section")
    args = parser.parse_args(argv)
    # the built-in catalog: the embedded default model, as `make run` serves it
    with private_appliance(default_model.MODEL_ID, {"max_queue": 8, "context_size": 2048}) as (broker, app):
        warm_up(app)
        soak = Soak(app, broker, time.monotonic() + args.minutes * 60, random.Random(args.seed))
        workers = [threading.Thread(target=soak.mqtt_requester, args=("5",)),
                   threading.Thread(target=soak.mqtt_requester, args=("3.1.1",)),
                   threading.Thread(target=soak.mqtt_canceller),
                   threading.Thread(target=soak.http_client, args=("/v1/chat/completions",)),
                   threading.Thread(target=soak.http_client, args=("/api/chat",)),
                   threading.Thread(target=soak.http_disconnector), threading.Thread(target=soak.prober)]
        for worker in workers:
            worker.start()
        start = soak.rss_mib()
        print(f"soak: warm RSS service {start[0]:.0f} MiB, worker {start[1]:.0f} MiB", flush=True)
        for worker in workers:
            worker.join()
        end = soak.rss_mib()
        ready = app.status().get("state") == "ready"
        tracebacks = app.log_text().count("Traceback")
    text = report(soak, args.minutes, start, end)
    text += f"\n\nService `ready` at the end: {'yes' if ready else 'NO'}; tracebacks in its log: {tracebacks}."
    print(text)
    if args.out:
        replace_section(args.out, "soak", text)
    return 0 if ready and not soak.tally.lost and not soak.tally.twice and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
