"""Prometheus metrics, in a registry of the service's own (two services in one test process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance.status import STATES, Status

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("appliance_requests", "Requests received, by transport and outcome "
                                "(ok or an error code).", ["transport", "outcome"], registry=r)
        self.errors = Counter("appliance_errors", "Error replies, by error code.", ["code"], registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "Requests waiting behind the running one.", registry=r)
        self.running = Gauge("appliance_requests_running", "Requests being generated now (0 or 1).", registry=r)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens evaluated.", registry=r)
        self.completion_tokens = Counter("appliance_completion_tokens", "Tokens generated.", registry=r)
        self.tokens_per_second = Gauge("appliance_tokens_per_second", "Generation speed of the last request.",
                                       registry=r)
        self.ttft = Histogram("appliance_time_to_first_token_seconds", "Time from start of generation to the "
                              "first token (prompt evaluation included).", buckets=_TTFT_BUCKETS, registry=r)
        self.duration = Histogram("appliance_request_duration_seconds", "Time from acceptance to the final reply.",
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.model_loaded = Gauge("appliance_model_loaded", "1 for the model that is loaded.", ["model"], registry=r)
        self.state = Gauge("appliance_state", "1 for the current state.", ["state"], registry=r)
        self.worker_restarts = Counter("appliance_worker_restarts", "Inference worker restarts.", registry=r)
        self.temperature = Gauge("appliance_cpu_temperature_celsius", "CPU temperature.", registry=r)
        self.mem_available = Gauge("appliance_memory_available_bytes", "MemAvailable.", registry=r)
        self.swap_free = Gauge("appliance_swap_free_bytes", "SwapFree.", registry=r)
        self.memory_pressure = Gauge("appliance_memory_pressure_avg10", "PSI memory stall, % of the last 10 s.",
                                     ["kind"], registry=r)
        self.worker_rss = Gauge("appliance_worker_rss_bytes", "Resident memory of the inference worker.", registry=r)
        self.throttle_flags = Gauge("appliance_throttle", "Raspberry Pi firmware flags now (vcgencmd).", ["flag"],
                                    registry=r)
        self.condition = Gauge("appliance_condition", "1 for the current memory and thermal level.",
                               ["kind", "level"], registry=r)
        self.callback_errors = Counter("appliance_callback_errors", "Exceptions caught in MQTT callbacks.",
                                       registry=r)
        for state in STATES:
            self.state.labels(state).set(0)

    def on_status(self, status: Status) -> None:
        for state in STATES:
            self.state.labels(state).set(1 if state == status.state else 0)
        self.model_loaded.clear()
        if status.model and status.state in ("ready", "busy"):
            self.model_loaded.labels(status.model).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
