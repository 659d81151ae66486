"""The appliance's configuration: one TOML file, overridable key by key from the environment.

Each section is a frozen dataclass; each field carries its documentation and its check in ``field(metadata=...)``,
so the config reference (``appliance config reference``) is generated from the same place that validates.
Any key can be overridden by ``APPLIANCE_<SECTION>_<KEY>`` (``APPLIANCE_MQTT_PORT=1884``), which is how systemd
drop-ins and the tests set single values. Loading collects every problem before failing, and each problem names
the key and the bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

ENV_PREFIX = "APPLIANCE_"
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

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
    if not _TOPIC_SAFE.match(v):
        return "must be 1-64 characters of letters, digits, '_', '.' or '-' (it is used in MQTT topics)"
    return None


def _prefix_check(v: str) -> str | None:
    if not v or any(c in v for c in "+#\0") or v.startswith("/") or v.endswith("/") or v.startswith("$"):
        return "must be a non-empty MQTT topic without wildcards, '$' or leading/trailing '/'"
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


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _opt("Serve the OpenAI-compatible HTTP API, health and metrics.", True)
    bind: str = _opt("Address to listen on; `0.0.0.0` for every interface.", "127.0.0.1")
    port: int = _opt("Port to listen on; 0 picks a free one (logged at start).", 8080, check=_between(0, 65535))
    api_key_file: Path | None = _opt("File holding a bearer API key; when set, every route but `/healthz` "
                                     "needs `Authorization: Bearer <key>`.", None)
    threads: int = _opt("HTTP worker threads (each open stream holds one).", 8, check=_between(1, 256))


@dataclass(frozen=True)
class ModelsConfig:
    catalog: Path | None = _opt("Model catalog (TOML). Default `<state_dir>/models/catalog.toml`; when that file "
                                "does not exist the built-in catalog (the embedded default model) is used.", None)
    default: str = _opt("Id of the model loaded at start and used when a request names none.", "gemma3-270m")
    verify: bool = _opt("Check each model file's sha256 against the catalog before loading it.", True)
    switch: bool = _opt("Let a request name another catalog model; the worker then swaps models (one model is "
                        "resident at a time). When false such requests get `unknown_model`.", True)


@dataclass(frozen=True)
class WorkerConfig:
    threads: int = _opt("Inference threads; 0 means the number of physical cores.", 0, check=_between(0, 256))
    context_size: int = _opt("Context window in tokens (prompt + completion).", 2048, check=_between(64, 131072))
    batch_size: int = _opt("Prompt tokens evaluated per step; a cancel is noticed between steps.", 256,
                           check=_between(8, 8192))
    max_queue: int = _opt("Requests that may wait behind the running one; beyond that a request gets `busy` "
                          "at once.", 8, check=_between(0, 10000))
    request_timeout: float = _opt("Seconds from acceptance to the final reply; then the requester gets `timeout`.",
                                  300.0, check=_between(1, 86400))
    default_max_tokens: int = _opt("max_tokens of a request that does not set it.", 256, check=_between(1, 131072))
    mmap: bool = _opt("Memory-map model files (pages stay in the page cache, shared and reclaimable).", True)
    cancel_grace: float = _opt("Seconds a cancelled or timed-out generation may take to stop before the worker "
                               "process is killed and restarted.", 5.0, check=_between(0.1, 600))
    load_timeout: float = _opt("Seconds a model load may take before the worker is considered stuck.", 600.0,
                               check=_between(1, 86400))


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
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def catalog_path(self) -> Path:
        return self.models.catalog or self.device.state_dir / "models" / "catalog.toml"

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"appliance-{self.device.id}"

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (used by ``serve --model``)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


SECTIONS: dict[str, type] = {"device": DeviceConfig, "mqtt": MqttConfig, "http": HttpConfig,
                             "models": ModelsConfig, "worker": WorkerConfig, "logging": LoggingConfig}


def _field_kind(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) from the annotation string, e.g. ``'Path | None'`` -> (Path, True)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = text.endswith("| None")
    base = text.replace("| None", "").strip()
    return {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}[base], optional


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path", bool: "true or false"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, kind: type, optional: bool, from_env: bool) -> Any:
    """Convert a TOML or environment value to ``kind``; raises ValueError with a reason."""
    if optional and (value is None or value == ""):
        return None
    if from_env:
        if kind is bool:
            low = value.strip().lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError("must be one of true/false/1/0/yes/no/on/off")
        if kind is int:
            return int(value.strip())
        if kind is float:
            return float(value.strip())
        return Path(value).expanduser() if kind is Path else value
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {type(value).__name__}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {type(value).__name__}")
        return float(value)
    if kind in (str, Path) and not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return Path(value).expanduser() if kind is Path else value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional), apply ``APPLIANCE_*`` overrides from ``env`` and validate everything.

    Raises :class:`ConfigError` listing every problem, each naming its key and value.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{path}: file not found"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None

    for name, value in data.items():
        if name not in SECTIONS:
            problems.append(f"[{name}]: unknown section{_suggest(name, list(SECTIONS))}")
        elif not isinstance(value, dict):
            problems.append(f"{name}: must be a table ([{name}]), not {type(value).__name__}")

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        raw = data.get(section) if isinstance(data.get(section), dict) else {}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                problems.append(f"{section}.{key}: unknown key{_suggest(key, names)}")
        env_prefix = f"{ENV_PREFIX}{section.upper()}_"
        for var in env:
            if var.startswith(env_prefix) and var[len(env_prefix):].lower() not in names:
                problems.append(f"{var}: no such key {section}.{var[len(env_prefix):].lower()}"
                                f"{_suggest(var[len(env_prefix):].lower(), names)}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind, optional = _field_kind(f)
            env_var = f"{env_prefix}{f.name.upper()}"
            if env_var in env:
                source, value, from_env = env_var, env[env_var], True
            elif f.name in raw:
                source, value, from_env = f"{section}.{f.name}", raw[f.name], False
            else:
                continue
            try:
                value = _coerce(value, kind, optional, from_env)
            except ValueError as exc:
                reason = str(exc) if from_env is False or kind is bool else f"must be {_KIND_NAMES[kind]}"
                problems.append(f"{source} = {value!r}: {reason}")
                continue
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices and value not in choices:
                problems.append(f"{source} = {value!r}: must be one of {', '.join(choices)}")
                continue
            if check and value is not None and (reason := check(value)):
                problems.append(f"{source} = {value!r}: {reason}")
                continue
            values[f.name] = value
        sections[section] = cls(**values)

    config = Config(**sections)
    problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[str]:
    problems = []
    m = config.mqtt
    if m.password_file and not m.username:
        problems.append("mqtt.password_file is set but mqtt.username is empty")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(m, key)
        if path is not None and not path.is_file():
            problems.append(f"mqtt.{key} = '{path}': file not found")
    if (m.cert_file is None) != (m.key_file is None):
        problems.append("mqtt.cert_file and mqtt.key_file must be set together")
    if (m.ca_file or m.cert_file) and not m.tls:
        problems.append("mqtt.ca_file/cert_file are set but mqtt.tls is false")
    key_file = config.http.api_key_file
    if key_file is not None:
        if not key_file.is_file():
            problems.append(f"http.api_key_file = '{key_file}': file not found")
        elif not key_file.read_text().strip():
            problems.append(f"http.api_key_file = '{key_file}': file is empty")
    if config.models.catalog is not None and not config.models.catalog.is_file():
        problems.append(f"models.catalog = '{config.models.catalog}': file not found")
    if config.worker.default_max_tokens > config.worker.context_size:
        problems.append(f"worker.default_max_tokens = {config.worker.default_max_tokens}: must not exceed "
                        f"worker.context_size ({config.worker.context_size})")
    return problems


def read_secret(path: Path) -> str:
    """First line of a secret file, stripped."""
    text = path.read_text().strip()
    return text.splitlines()[0].strip() if text else ""


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the dataclasses above."""
    lines = ["# Configuration reference", "",
             "One TOML file (`appliance serve -c FILE`); every key is optional. Any key can be overridden by the "
             "environment variable `APPLIANCE_<SECTION>_<KEY>`, e.g. `APPLIANCE_MQTT_PORT=1884`. "
             "`appliance config check FILE` validates a file and prints every problem.", "",
             "Generated by `appliance config reference`; do not edit by hand.", ""]
    for section, cls in SECTIONS.items():
        lines += [f"## [{section}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind, optional = _field_kind(f)
            if f.default is dataclasses.MISSING:
                default = {"id": "host name", "state_dir": "`$STATE_DIRECTORY` or `~/.local/share/appliance`"}[f.name]
            elif f.default is None:
                default = "(unset)"
            else:
                default = "`" + _toml_literal(f.default) + "`"
            type_name = kind.__name__ + (" (optional)" if optional else "")
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            lines.append(f"| `{f.name}` | {type_name} | {default} | {doc} |")
        lines.append("")
    return "\n".join(lines)
