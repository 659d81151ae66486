"""The fuzz campaign (issue 10): send generated payloads to a running appliance, one at a time, and check each answer.

One at a time, so every answer belongs to the payload just sent: an MQTT payload must get exactly one final reply
(`result` or `error`) somewhere, an HTTP one a response that is not a 5xx. Counted as failures: an `internal` error
or a 5xx (a bug the parser let through), a payload with no final reply within the bound (lost), a second final reply
(answered twice), and the service not `ready` at the end or its worker restarted (a crash).

    app = new_appliance(workdir, broker.port, write_catalog(workdir), "tiny").start()
    campaign = Campaign(app, broker.host, broker.port)
    tally = campaign.run(count=300, seed=1)      # hypothesis draws the payloads, reproducibly for a seed
    assert tally.failures() == []
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from tests.support import tiny_models, tiny_onnx
from tests.support.fuzz_payloads import Payload, payloads
from tests.support.harness import Appliance, MqttClient

FINAL_TYPES = ("result", "error")
#: the ONNX model the campaign's infer payloads name (a text classifier: it takes {"text": ...})
INFER_MODEL = "guard"


def write_catalog(directory: Path) -> Path:
    """The models the payloads name: ``tiny`` (Q4_0, a named template), ``tiny-chat`` (a Jinja chat template in the
    GGUF), the ONNX text classifier ``guard`` and the ONNX embedder ``tiny-embed``; all small, so a valid request is
    answered in milliseconds."""
    f32 = tiny_models.write_llama(directory / "fuzz-f32.gguf")
    tiny = tiny_models.quantize(f32, directory / "fuzz-q4_0.gguf", "q4_0")
    chat = tiny_models.write_llama(directory / "fuzz-chat.gguf", seed=1, chat_template=tiny_models.CHAT_TEMPLATE)
    guard = tiny_onnx.write_text_classifier(directory / "fuzz-guard.onnx", ["forbidden"])
    embedder, tokenizer = tiny_onnx.write_embedder(directory / "fuzz-embed.onnx", directory / "fuzz-tokenizer.json")
    catalog = directory / "fuzz-catalog.toml"
    catalog.write_text(tiny_models.catalog_entry("tiny", tiny, template="chatml")
                       + tiny_models.catalog_entry("tiny-chat", chat)
                       + tiny_onnx.text_classifier_entry(guard, model_id=INFER_MODEL)
                       + tiny_onnx.embedder_entry(embedder, tokenizer))
    return catalog


@dataclass
class Tally:
    """What the campaign saw: counts for the report, and the payloads behind every failure."""

    sent: Counter = field(default_factory=Counter)  # per target
    outcomes: Counter = field(default_factory=Counter)  # "ok", an error code, or "http <status>"
    internal: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    restarts: int = 0
    internal_metric: int = 0  # appliance_errors_total{code="internal"} at the end: errors no payload was told of
    ready_at_end: bool = False
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def failures(self) -> list[str]:
        problems = [f"internal: {p}" for p in self.internal] + [f"no reply: {p}" for p in self.lost]
        problems += [f"answered twice: {p}" for p in self.twice]
        if self.restarts:
            problems.append(f"the worker restarted {self.restarts} times")
        if self.internal_metric > len(self.internal):
            problems.append(f"the service counted {self.internal_metric} internal errors")
        if not self.ready_at_end:
            problems.append("the service was not ready at the end")
        return problems


class Campaign:
    """Drives one appliance; ``infer_model`` is an ONNX model id in its catalog (MQTT infer and /v1/infer)."""

    def __init__(self, app: Appliance, broker_host: str, broker_port: int, *, infer_model: str = INFER_MODEL,
                 reply_timeout: float = 60) -> None:
        self.app, self.infer_model, self.reply_timeout = app, infer_model, reply_timeout
        self.run_id = uuid.uuid4().hex[:8]
        # one listener on everything but the request topics: a final reply is attributed to the payload in flight,
        # wherever the appliance sent it (a fuzzed reply_to it accepted, or its own reply topic)
        self.listener = MqttClient(broker_host, broker_port)
        self.listener.subscribe("#", qos=1)
        self.senders = {"5": MqttClient(broker_host, broker_port), "3.1.1": MqttClient(broker_host, broker_port,
                                                                                        protocol="3.1.1")}
        self.http = http.client.HTTPConnection("127.0.0.1", app.config["http"]["port"], timeout=reply_timeout)

    def run(self, count: int, seed: int) -> Tally:
        tally = Tally()
        restarts_before = self._restarts()
        started = time.monotonic()

        @hypothesis_seed(seed)
        @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(payloads(self.infer_model))
        def send_one(payload: Payload) -> None:
            tally.sent[payload.target] += 1
            if payload.target == "http":
                self._http(payload, tally)
            else:
                self._mqtt(payload, tally)

        send_one()
        self._check_no_late_finals(tally)
        tally.seconds = time.monotonic() - started
        tally.restarts = self._restarts() - restarts_before
        tally.internal_metric = int(self.app.metric('appliance_errors_total{code="internal"}') or 0)
        tally.ready_at_end = self._ready()
        return tally

    # -- MQTT: exactly one final reply per payload -------------------------------------------------------------------

    def _mqtt(self, payload: Payload, tally: Tally) -> None:
        n = tally.total
        marker = len(self.listener.messages)
        if payload.target == "mqtt311":
            body = payload.body
            try:  # name a reply topic of ours where the body can carry one and the fuzz did not pick its own
                decoded = json.loads(body)
                if isinstance(decoded, dict) and "reply_to" not in decoded:
                    body = json.dumps({**decoded, "reply_to": f"fuzz/{self.run_id}/{n}"}).encode()
            except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes: as it is
                pass
            self.senders["3.1.1"].publish(self.app.topic("generate"), body)
        else:
            leaf = {"mqtt5-infer": f"infer/{self.infer_model}", "mqtt5-embed": "embed"}.get(payload.target, "generate")
            topic = self.app.topic(leaf)
            self.senders["5"].publish(topic, payload.body, response_topic=f"fuzz/{self.run_id}/{n}",
                                      correlation=str(n).encode())
        try:
            final = self._next_final(marker)
        except TimeoutError:
            tally.lost.append(payload.describe())
            tally.outcomes["no reply"] += 1
            return
        code = final["error"]["code"] if final["type"] == "error" else "ok"
        tally.outcomes[code] += 1
        if code == "internal":
            tally.internal.append(f"{payload.describe()} -> {final['error']}")

    def _next_final(self, marker: int) -> dict:
        found: list[dict] = []

        def arrived(_message) -> bool:
            found.clear()
            found.extend(f for f in (self._final(m) for m in self.listener.messages[marker:]) if f is not None)
            return bool(found)

        self.listener.wait_for(arrived, timeout=self.reply_timeout)
        return found[0]

    def _final(self, message) -> dict | None:
        """The reply a message carries, when it is a final one (not a chunk, a request or a status)."""
        device_prefix = self.app.topic("")
        if message.topic.startswith(device_prefix) and message.topic != self.app.topic("reply"):
            return None  # requests (ours), status, telemetry
        try:
            body = json.loads(message.payload)
        except (ValueError, RecursionError):
            return None
        return body if isinstance(body, dict) and body.get("type") in FINAL_TYPES else None

    def _check_no_late_finals(self, tally: Tally) -> None:
        """Every final reply seen, counted against the MQTT payloads sent: more means one was answered twice."""
        time.sleep(2)
        finals = sum(1 for m in self.listener.messages if self._final(m) is not None)
        mqtt_sent = sum(n for target, n in tally.sent.items() if target != "http")
        if finals > mqtt_sent - len(tally.lost):
            tally.twice.append(f"{finals} final replies to {mqtt_sent - len(tally.lost)} answered MQTT payloads")

    # -- HTTP: a structured answer, never a 5xx ----------------------------------------------------------------------

    def _http(self, payload: Payload, tally: Tally) -> None:
        headers = {"Content-Type": "application/json"} if payload.body else {}
        try:
            self.http.request(payload.method, payload.path, body=payload.body or None, headers=headers)
            response = self.http.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.http.close()  # a fresh connection for the next payload
            tally.lost.append(f"{payload.describe()} -> {type(exc).__name__}: {exc}")
            tally.outcomes["no reply"] += 1
            return
        tally.outcomes[f"http {response.status}"] += 1
        # a stream (SSE or NDJSON) reports an error inside a 200: look for the code anywhere in the body
        if response.status >= 500 or b'"code": "internal"' in data or b'"code":"internal"' in data:
            tally.internal.append(f"{payload.describe()} -> {response.status} {data[:300]!r}")

    # -- the service after the campaign ------------------------------------------------------------------------------

    def _restarts(self) -> int:
        return int(self.app.metric("appliance_worker_restarts_total") or 0)

    def _ready(self) -> bool:
        try:
            return self.app.status().get("state") == "ready" and self.app.proc is not None \
                and self.app.proc.poll() is None
        except OSError:
            return False

    def close(self) -> None:
        self.http.close()
        for client in (self.listener, *self.senders.values()):
            client.close()
