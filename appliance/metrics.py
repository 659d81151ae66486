"""Prometheus metrics, in a registry of the service's own (two services in one test process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance.status import STATES, Status

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter, gauge = self._counter, self._gauge
        # requests
        self.requests = counter("requests", "Requests received, by transport and outcome (ok or an error code).",
                                "transport", "outcome")
        self.errors = counter("errors", "Error replies, by error code.", "code")
        self.queue_depth = gauge("queue_depth", "Requests waiting behind the running one.")
        self.running = gauge("requests_running", "Requests being generated now (0 to worker.parallel).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens evaluated.")
        self.completion_tokens = counter("completion_tokens", "Tokens generated.")
        self.tokens_per_second = gauge("tokens_per_second", "Generation speed of the last request.")
        self.ttft = Histogram("appliance_time_to_first_token_seconds", "Time from start of generation to the "
                              "first token (prompt evaluation included).", buckets=_TTFT_BUCKETS,
                              registry=self.registry)
        self.duration = Histogram("appliance_request_duration_seconds", "Time from acceptance to the final reply.",
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        # the service
        self.model_loaded = gauge("model_loaded", "1 for the model that is loaded.", "model")
        self.state = gauge("state", "1 for the current state.", "state")
        self.condition = gauge("condition", "1 for the current memory and thermal level.", "kind", "level")
        self.worker_restarts = counter("worker_restarts", "Inference worker restarts.")
        self.callback_errors = counter("callback_errors", "Exceptions caught in MQTT callbacks.")
        self.mqtt_redeliveries = counter("mqtt_redeliveries", "Broker redeliveries (DUP) of a request already in "
                                         "progress or answered: not run again.", "state")
        # the board
        self.temperature = gauge("cpu_temperature_celsius", "CPU temperature.")
        self.throttle_flags = gauge("throttle", "Raspberry Pi firmware flags now (vcgencmd).", "flag")
        self.mem_available = gauge("memory_available_bytes", "MemAvailable.")
        self.memory_pressure = gauge("memory_pressure_avg10", "PSI memory stall, % of the last 10 s.", "kind")
        self.swap_free = gauge("swap_free_bytes", "SwapFree.")
        self.worker_rss = gauge("worker_rss_bytes", "Resident memory of the inference worker.")
        for state in STATES:
            self.state.labels(state).set(0)

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(f"appliance_{name}", doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(f"appliance_{name}", doc, labels, registry=self.registry)

    def on_status(self, status: Status) -> None:
        for state in STATES:
            self.state.labels(state).set(1 if state == status.state else 0)
        self.model_loaded.clear()
        if status.model and status.state in ("ready", "busy"):
            self.model_loaded.labels(status.model).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
