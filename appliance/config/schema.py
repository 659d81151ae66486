"""The configuration schema: one frozen dataclass per TOML section.

Each field carries its documentation and its check in ``field(metadata=...)``, so the reference
(``appliance config reference``, docs/config.md) and the validation come from the same place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "APPLIANCE_"
_TOPIC_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

Check = Callable[[Any], str | None]


def _opt(doc: str, default: Any = dataclasses.MISSING, *, check: Check | None = None,
         factory: Callable[[], Any] | None = None, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"doc": doc, "check": check, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _topic_safe(v: str) -> str | None:
    if not _TOPIC_SAFE.fullmatch(v):
        return "must be 1-64 characters of letters, digits, '_', '.' or '-' (it is used in MQTT topics)"
    return None


def _prefix_check(v: str) -> str | None:
    if not v or any(c in v for c in "+#\0") or v.startswith("/") or v.endswith("/") or v.startswith("$"):
        return "must be a non-empty MQTT topic without wildcards, '$' or leading/trailing '/'"
    return None


#: the rwkv package's strategy grammar, CPU devices only ("cpu fp32i8", "cpu fp32i8 *20 -> cpu fp32", ...)
_RWKV_STRATEGY = re.compile(r"(?:(?:^|->) *cpu (?:fp(?:16|32)|bf16)(?:i8)? *(?:\*\d+\+?)? *)+")


def rwkv_strategy_problem(v: str) -> str | None:
    if not _RWKV_STRATEGY.fullmatch(v):
        return ("must be an rwkv strategy for the CPU, e.g. \"cpu fp32i8\" (int8 weights), \"cpu fp32\", "
                "\"cpu bf16\" or \"cpu fp32i8 *10 -> cpu fp32\"")
    return None


def default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip("-.")
    return host or "appliance"


def default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` when run as a unit, else the user's XDG data directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "appliance"


@dataclass(frozen=True)
class DeviceConfig:
    id: str = _opt("Device id; appears in MQTT topics `<prefix>/<id>/...` and in status.",
                   factory=default_device_id, check=_topic_safe)
    state_dir: Path = _opt("Writable directory for models, the private broker's data and other state.",
                           factory=default_state_dir)
    release_dir: Path = _opt("Where the bundle installer keeps the releases and the `current` and `previous` links; "
                             "the operator page shows both.", Path("/opt/appliance"))


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = _opt("Serve requests over MQTT.", True)
    host: str = _opt("Broker host. Empty means no broker is configured: a private mosquitto is started on "
                     "loopback when `private_broker` is true, else the appliance serves HTTP only.", "")
    port: int = _opt("Broker port (and the private broker's port).", 1883, check=_between(1, 65535))
    username: str = _opt("Username for the broker; empty for none.", "")
    password_file: Path | None = _opt("File holding the broker password (first line).", None)
    tls: bool = _opt("Connect with TLS.", False)
    ca_file: Path | None = _opt("CA bundle for TLS; the system store when empty.", None)
    cert_file: Path | None = _opt("Client certificate for mutual TLS.", None)
    key_file: Path | None = _opt("Client key for mutual TLS.", None)
    topic_prefix: str = _opt("First topic level of every topic.", "appliance", check=_prefix_check)
    protocol: str = _opt("MQTT protocol version.", "5", choices=("5", "3.1.1"))
    client_id: str = _opt("MQTT client id; default `appliance-<device.id>`. Must be stable: the persistent "
                          "session that holds requests while the appliance is down is keyed by it.", "")
    keepalive: int = _opt("Keepalive in seconds; the broker publishes the `offline` will after 1.5x this.",
                          30, check=_between(5, 3600))
    session_expiry: int = _opt("Seconds the broker keeps the session (and queued requests) after a disconnect.",
                               86400, check=_between(0, 4294967295))
    reply_expiry: int = _opt("Message expiry (seconds) on replies, so stale answers are not delivered to a "
                             "requester that comes back much later; 0 for none.", 600, check=_between(0, 4294967295))
    fleet: bool = _opt("Also take requests from the fleet topic `<prefix>/fleet/generate`, shared with the "
                       "other devices on the broker.", True)
    fleet_session_expiry: int = _opt("Session expiry (seconds) of the fleet connection. 0: the broker forgets "
                                     "this device's share of fleet requests as soon as it disconnects, so a device "
                                     "that is down is never handed fleet work (fleet requests it held when it died "
                                     "are lost; requesters retry on timeout). Larger values let a quick restart "
                                     "pick its fleet requests up again, at the price of fleet work queued to it "
                                     "while it is away.", 0, check=_between(0, 4294967295))
    fleet_group: str = _opt("Share name of the fleet subscription (`$share/<group>/<prefix>/fleet/generate`).",
                            "appliance", check=_topic_safe)
    private_broker: bool = _opt("When `host` is empty, start a private mosquitto on 127.0.0.1:`port`.", True)
    max_payload: int = _opt("Largest request payload in bytes; larger ones get `bad_request`.", 1048576,
                            check=_between(1024, 268435455))
    dedupe_window: float = _opt("Seconds an answered request's final reply is kept, so that a broker redelivery "
                                "of it (DUP flag, after a reconnect) gets that reply again instead of a second run. "
                                "A new publish reusing an id is always answered (docs/protocol.md). The delivery "
                                "journal counts it in time the device is on, never from the wall clock.", 3600.0,
                                check=_between(1, 604800))
    journal: bool = _opt("Keep the delivery journal (`<state_dir>/mqtt-journal`, flushed to the card): accepted "
                         "requests are answered after a power cut and none answered before it is answered again "
                         "(docs/protocol.md). false: answered requests are remembered in memory only.", True)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _opt("Serve the OpenAI-compatible HTTP API, health and metrics.", True)
    bind: str = _opt("Address to listen on: a loopback address serves this device only; `0.0.0.0` (every "
                     "interface) or any other address serves the network, which needs `api_key_file` (or "
                     "`allow_anonymous`): without either the service refuses to start.", "127.0.0.1")
    port: int = _opt("Port to listen on; 0 picks a free one (logged at start).", 8080, check=_between(0, 65535))
    api_key_file: Path | None = _opt("File holding the bearer API key on its one line (16-256 printable ASCII "
                                     "characters, no spaces); when set, every route but `/healthz` needs "
                                     "`Authorization: Bearer <key>`.", None)
    allow_anonymous: bool = _opt("Serve every route without a key on a `bind` address that is not loopback. Anyone "
                                 "who can reach the port can then run the models, read `/status` and `/metrics`, "
                                 "all in plain HTTP. Only for a network where every host is trusted; otherwise set "
                                 "`api_key_file`.", False)
    threads: int = _opt("HTTP worker threads. A request waiting for its answer holds one; 4 of them (half, below 8) "
                        "are kept for health, metrics and `busy` refusals, so a request that finds the rest taken "
                        "gets `busy` at once.", 16, check=_between(1, 256))


@dataclass(frozen=True)
class ModelsConfig:
    catalog: Path | None = _opt("Model catalog (TOML). Default `<state_dir>/models/catalog.toml`; when that file "
                                "does not exist the built-in catalog (the embedded default model) is used.", None)
    default: str = _opt("Id of the model loaded at start and used when a request names none.",
                        "smollm2-135m-instruct")
    system_prompt: str = _opt("System message put before every chat (`messages`) request that has none, for every "
                              "model; it replaces each catalog entry's own `system_prompt`. Empty: each model's "
                              "`system_prompt` from the catalog (the embedded default model has one; "
                              "docs/models.md). A request's own system message always wins.", "")
    verify: bool = _opt("Check each model file's sha256 against the catalog before loading it.", True)
    switch: bool = _opt("Let a request name another catalog model; the worker then swaps models (one model is "
                        "resident at a time). When false such requests get `unknown_model`.", True)
    allow_noncommercial: bool = _opt("Load models whose catalog entry says `commercial_use = false` (research-only "
                                     "licences such as LLaMA-1 derivatives: Alpaca, Vicuna, Koala, Baize). Off, such "
                                     "a model is refused with an error naming its licence.", False)


def _labels(v: str) -> str | None:
    if not [x for x in v.split(",") if x.strip()] or any(not x.strip() for x in v.split(",")):
        return "must be a comma-separated list of labels, e.g. \"flagged\" or \"toxic,threat\""
    return None


@dataclass(frozen=True)
class ModerationConfig:
    model: str = _opt("Catalog id of an ONNX text classifier run on the prompt or messages of every generate request "
                      "(MQTT and HTTP) before the language model sees them; its catalog entry declares `featurize` "
                      "(docs/models.md). A request it flags gets `moderated`. Empty: no moderation.", "")
    block: str = _opt("Comma-separated labels of the classifier's output that refuse a request when their score is "
                      "at or above `threshold`.", "flagged", check=_labels)
    threshold: float = _opt("Score at or above which a label in `block` refuses the request.", 0.5,
                            check=_between(0, 1))
    output: str = _opt("Output of the classifier to read; empty: its first output that declares labels.", "")


@dataclass(frozen=True)
class WorkerConfig:
    threads: int = _opt("Inference threads; 0 means the number of physical cores.", 0, check=_between(0, 256))
    context_size: int = _opt("Context window in tokens (prompt + completion).", 2048, check=_between(64, 131072))
    batch_size: int = _opt("Prompt tokens evaluated per step; a cancel is noticed between steps.", 256,
                           check=_between(8, 8192))
    parallel: int = _opt("Requests one llama.cpp model generates at once, decoded together in one batch (each "
                         "gets its own `context_size` of KV cache, so memory grows with it; the memory guard may "
                         "run fewer). Recurrent (RWKV, Mamba) and encoder-decoder (T5) models run one at a time.", 1,
                         check=_between(1, 64))
    max_queue: int = _opt("Requests that may wait behind the running ones; beyond that a request gets `busy` "
                          "at once.", 8, check=_between(0, 10000))
    request_timeout: float = _opt("Seconds from acceptance to the final reply; then the requester gets `timeout`.",
                                  300.0, check=_between(1, 86400))
    default_max_tokens: int = _opt("max_tokens of a request that does not set it.", 256, check=_between(1, 131072))
    mmap: bool = _opt("Memory-map model files (pages stay in the page cache, shared and reclaimable).", True)
    flash_attention: bool = _opt("llama.cpp's flash attention, as `llama-server` runs by default (a batched "
                                 "step was 5-18 % faster with it here). At temperature 0 a text may differ from "
                                 "the one without it (6 of 100 prompts did, from the first token); alone and "
                                 "batched stay identical. Off, the single-request path is token-identical to "
                                 "llama-cpp-python's (docs/benchmarks.md).", False)
    rwkv_strategy: str = _opt("How the rwkv backend holds RWKV `.pth` weights, unless the catalog entry sets "
                              "`strategy`: `cpu fp32i8` stores matrices as int8 (a quarter of the bytes of "
                              "`cpu fp32`, but it dequantises on every token: many times slower on CPU, and on a "
                              "small model a higher peak; measured figures in docs/models.md); RWKV-7 has no int8 "
                              "mode and uses the float type alone.", "cpu fp32i8", check=rwkv_strategy_problem)
    cancel_grace: float = _opt("Seconds a cancelled or timed-out generation may take to stop before the worker "
                               "process is killed and restarted.", 5.0, check=_between(0.1, 600))
    load_timeout: float = _opt("Seconds a model load may take before the worker is considered stuck.", 600.0,
                               check=_between(1, 86400))
    stall_timeout: float = _opt("Seconds a running generation may go without progress (a prompt batch or a token) "
                                "before the worker is killed and restarted; its requester gets `timeout`.", 120.0,
                                check=_between(1, 86400))
    max_restarts: int = _opt("Worker restarts allowed within `restart_window`; one more and the status becomes "
                             "`error` and the worker stays down for `restart_window` seconds, then is tried "
                             "again. A worker killed because a cancelled or timed-out request did not stop within "
                             "`cancel_grace` is not a crash and is not counted.", 5, check=_between(1, 1000))
    restart_window: float = _opt("Seconds over which `max_restarts` counts.", 300.0, check=_between(1, 86400))


def _fan_curve(v: str) -> str | None:
    try:
        points = [tuple(float(x) for x in p.split(":")) for p in v.split(",") if p.strip()]
    except ValueError:
        return "must be comma-separated celsius:speed pairs, e.g. \"50:0.3,60:0.5,75:1.0\""
    if any(len(p) != 2 or not 0 <= p[1] <= 1 for p in points) or points != sorted(points):
        return "must be celsius:speed pairs in rising order, speeds between 0 and 1"
    return None


@dataclass(frozen=True)
class MemoryConfig:
    admission: bool = _opt("Estimate each model's memory (weights + KV cache + compute buffers + margin, from the "
                           "GGUF) before loading it, and refuse the load when it does not fit.", True)
    budget_mib: int = _opt("Memory a model may use, in MiB; 0 means what the kernel reports available "
                           "(MemAvailable). Set it to override the measurement.", 0, check=_between(0, 1 << 24))
    margin_mib: int = _opt("Added to every estimate: the worker process itself and allocator slack.", 128,
                           check=_between(0, 1 << 20))
    low_mib: int = _opt("MemAvailable below this: low-priority requests get `busy`.", 256, check=_between(0, 1 << 24))
    critical_mib: int = _opt("MemAvailable below this: the running generation is stopped (`memory`) and the model "
                             "unloaded until memory recovers.", 96, check=_between(0, 1 << 24))
    hysteresis_mib: int = _opt("A state is left only once MemAvailable is this far back above its threshold.", 64,
                               check=_between(0, 1 << 20))
    psi_low: float = _opt("PSI memory `some` avg10 (%) above this also means low.", 40.0, check=_between(0, 100))
    psi_critical: float = _opt("PSI memory `full` avg10 (%) above this also means critical.", 30.0,
                               check=_between(0, 100))
    psi_hysteresis: float = _opt("How far PSI must fall below a threshold to leave its state.", 10.0,
                                 check=_between(0, 100))
    meminfo_path: Path = _opt("Where MemAvailable and swap are read.", Path("/proc/meminfo"))
    psi_path: Path = _opt("Memory pressure (PSI); ignored when missing (Pi kernels need `psi=1`).",
                          Path("/proc/pressure/memory"))


@dataclass(frozen=True)
class ThermalConfig:
    sensor_file: Path = _opt("CPU temperature in millidegrees (read through gpiozero's CPUTemperature); ignored when "
                             "missing.", Path("/sys/class/thermal/thermal_zone0/temp"))
    soft_limit: float = _opt("°C. Above it the worker slows down: fewer threads, a pause between tokens, "
                             "shorter answers.", 75.0, check=_between(30, 120))
    hard_limit: float = _opt("°C. Above it generation pauses until the board cools below `hard_limit - hysteresis` "
                             "and new requests get `thermal`.", 82.0, check=_between(30, 120))
    hysteresis: float = _opt("°C below a limit before its state is left.", 5.0, check=_between(0.5, 50))
    soft_threads: int = _opt("Inference threads above the soft limit; 0 means half of worker.threads.", 0,
                             check=_between(0, 256))
    soft_token_delay: float = _opt("Seconds of pause after each token above the soft limit.", 0.05,
                                   check=_between(0, 10))
    soft_max_tokens: int = _opt("max_tokens cap for requests started above the soft limit.", 128,
                                check=_between(1, 131072))
    vcgencmd: str = _opt("Command that prints the Raspberry Pi throttle flags (`vcgencmd get_throttled`); empty "
                         "to disable. Under-voltage and throttling are reported as status warnings.", "vcgencmd")
    throttle_interval: float = _opt("Seconds between runs of vcgencmd.", 5.0, check=_between(0.1, 3600))


@dataclass(frozen=True)
class SupervisorConfig:
    interval: float = _opt("Seconds between readings of memory, temperature and throttle flags.", 1.0,
                           check=_between(0.1, 60))
    telemetry_interval: float = _opt("Seconds between retained `<prefix>/<device>/telemetry` messages; 0 for none.",
                                     30.0, check=_between(0, 86400))


@dataclass(frozen=True)
class GpioConfig:
    enabled: str = _opt("`auto`: use GPIO when the board has it, silently not otherwise; `true`: fail when it is "
                        "missing; `false`: never.", "auto", choices=("auto", "true", "false"))
    pin_factory: str = _opt("gpiozero pin factory (`lgpio`, `rpigpio`, `mock` for tests); empty for gpiozero's "
                            "own choice.", "")
    status_led: str = _opt("Pin of the status LED (e.g. `GPIO17`); empty for none. Patterns: loading fast blink, "
                           "ready on, busy slow blink, hot short flash, degraded blink, error flicker.", "")
    fan_pin: str = _opt("PWM pin of a fan; empty for none.", "")
    fan_curve: str = _opt("Fan speed by temperature, `celsius:speed` pairs (speeds 0-1); off below the first.",
                          "50:0.3,60:0.5,67.5:0.7,75:1.0", check=_fan_curve)
    shutdown_button: str = _opt("Pin of a shutdown button (to ground); empty for none.", "")
    shutdown_hold: float = _opt("Seconds the button must be held.", 3.0, check=_between(0.1, 60))
    shutdown_command: str = _opt("Command run when the button is held.", "systemctl poweroff")


def _languages(v: str) -> str | None:
    codes = [x.strip() for x in v.split(",")]
    if not all(re.fullmatch(r"[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*", c) for c in codes):
        return "must be a comma-separated list of language codes, e.g. \"en,es,zh\""
    return None


def _addresses(v: str) -> str | None:
    import ipaddress
    for part in filter(None, (x.strip() for x in v.split(","))):
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            return f"{part!r} is not an IP address or network (e.g. \"192.168.1.10\" or \"192.168.1.0/24\")"
    return None


@dataclass(frozen=True)
class HomeAssistantConfig:
    discovery: bool = _opt("Announce the device to Home Assistant by MQTT discovery: one device with sensors for its "
                           "state, temperature, memory, throttle flags, tokens/s, queue depth, loaded model and "
                           "version, and a binary sensor for under-voltage, read from the retained status and "
                           "telemetry topics. Off, nothing is published under `prefix` (and what an earlier run "
                           "announced there is withdrawn).", False)
    prefix: str = _opt("Home Assistant's discovery prefix.", "homeassistant", check=_prefix_check)
    status_topic: str = _opt("Where Home Assistant publishes its birth (`online`) and will (`offline`) messages; "
                             "on `online` the device announces itself again. Empty: `<prefix>/status`.", "")
    name: str = _opt("The device's name in Home Assistant; empty: `device.id`.", "")


@dataclass(frozen=True)
class WyomingConfig:
    enabled: bool = _opt("Serve the Wyoming protocol as a conversation agent (a `handle` program): Home Assistant's "
                         "Assist sends the recognised text and speaks the model's reply.", False)
    bind: str = _opt("Address to listen on. Wyoming has no credentials: any address but loopback needs "
                     "`allow_anonymous = true`.", "127.0.0.1")
    port: int = _opt("TCP port.", 10600, check=_between(0, 65535))
    allow_anonymous: bool = _opt("Allow `bind` to be a non-loopback address although Wyoming clients cannot present "
                                 "a credential: anyone who can reach the port can use the model. Narrow it with "
                                 "`allowed_clients`.", False)
    allowed_clients: str = _opt("Comma-separated addresses or networks (`192.168.1.10`, `10.0.0.0/24`) allowed to "
                                "connect; empty: any. Others are disconnected at once.", "", check=_addresses)
    languages: str = _opt("Languages advertised to Home Assistant (comma-separated codes).", "en,es,zh",
                          check=_languages)
    model: str = _opt("Catalog id of the model that answers; empty: `models.default`.", "")
    max_tokens: int = _opt("Longest reply in tokens (a spoken answer should be short).", 160,
                           check=_between(1, 131072))
    temperature: float = _opt("Sampling temperature of replies.", 0.7, check=_between(0, 5))
    system_prompt: str = _opt("System message sent before the conversation; empty: a short instruction to answer "
                              "briefly, in the language of the question, for speech.", "")
    history_turns: int = _opt("Earlier turns of the same Home Assistant conversation sent with each question "
                              "(kept in memory for 5 minutes; 0: every question stands alone).", 4,
                              check=_between(0, 32))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt("Log level.", "info", choices=("debug", "info", "warning", "error"))
    log_prompts: bool = _opt("Write prompt and completion text to the log (debug level). Off by default: request "
                             "text never reaches logs unless the operator turns this on.", False)
    format: str = _opt("`text` for people, `json` for log shippers.", "text", choices=("text", "json"))


@dataclass(frozen=True)
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    thermal: ThermalConfig = field(default_factory=ThermalConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)

    @property
    def catalog_path(self) -> Path:
        return self.models.catalog or self.device.state_dir / "models" / "catalog.toml"

    @property
    def homeassistant_status_topic(self) -> str:
        return self.homeassistant.status_topic or f"{self.homeassistant.prefix}/status"

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"appliance-{self.device.id}"

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (used by ``serve --model``)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


SECTIONS: dict[str, type] = {"device": DeviceConfig, "mqtt": MqttConfig, "http": HttpConfig,
                             "models": ModelsConfig, "moderation": ModerationConfig, "worker": WorkerConfig,
                             "logging": LoggingConfig, "memory": MemoryConfig, "thermal": ThermalConfig,
                             "supervisor": SupervisorConfig, "gpio": GpioConfig,
                             "homeassistant": HomeAssistantConfig, "wyoming": WyomingConfig}


