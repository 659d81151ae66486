"""Loading the configuration: TOML, then ``APPLIANCE_<SECTION>_<KEY>`` overrides, then every check.

Loading collects every problem before failing, and each problem names the key (or environment variable) and the
bad value, with a suggestion for a misspelt key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.config.credentials import api_key_problem, control_character, secret_file_problem
from appliance.config.schema import ENV_PREFIX, SECTIONS, Config
from appliance.errors import ConfigError


def field_kind(f: dataclasses.Field[Any]) -> tuple[type, bool]:
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


#: keys that name a file holding a secret: an operator may put the secret itself there by mistake
SECRET_FILES = {("mqtt", "password_file"), ("mqtt", "key_file"), ("http", "api_key_file")}


def _shown(section: str, key: str, value: Any, source: str | None = None) -> str:
    """``section.key = value`` (or ``source = value``: an environment variable) for a problem; the value of a
    secret file's key only when it looks like a path."""
    source = source or f"{section}.{key}"
    if (section, key) in SECRET_FILES and not (isinstance(value, (str, Path)) and "/" in str(value)):
        return f"{source} (value not shown: not a path, perhaps the secret itself)"
    return f"{source} = {str(value)!r}" if isinstance(value, Path) else f"{source} = {value!r}"


def read_toml(path: Path) -> dict[str, Any]:
    """A config file's own tables, unchecked; ConfigError naming the file when it is missing or not TOML."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


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
        data = read_toml(Path(path))

    for name, value in data.items():
        if name not in SECTIONS:
            problems.append(f"[{name}]: unknown section{_suggest(name, list(SECTIONS))}")
        elif not isinstance(value, dict):
            problems.append(f"{name}: must be a table ([{name}]), not {type(value).__name__}")

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        given = data.get(section)
        raw: dict[str, Any] = given if isinstance(given, dict) else {}
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
            kind, optional = field_kind(f)
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
                problems.append(f"{_shown(section, f.name, value, source)}: {reason}")
                continue
            if kind in (str, Path) and value is not None and (char := control_character(str(value))):
                problems.append(f"{source}: contains a control character ({char}); line breaks, tabs and the "
                                f"like are not allowed")
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
    if any(c in m.username for c in "+#/"):
        problems.append(f"mqtt.username = {m.username!r}: must not contain '+', '#' or '/' (the broker's ACL "
                        f"patterns use it as a topic level)")
    if m.password_file is not None and m.password_file.is_file() \
            and (reason := secret_file_problem(m.password_file)):
        problems.append(f"{_shown('mqtt', 'password_file', m.password_file)}: {reason}")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(m, key)
        if path is not None and not path.is_file():
            problems.append(f"{_shown('mqtt', key, path)}: file not found")
    if (m.cert_file is None) != (m.key_file is None):
        problems.append("mqtt.cert_file and mqtt.key_file must be set together")
    if (m.ca_file or m.cert_file) and not m.tls:
        problems.append("mqtt.ca_file/cert_file are set but mqtt.tls is false")
    problems.extend(_http_checks(config))
    if config.models.catalog is not None and not config.models.catalog.is_file():
        problems.append(f"models.catalog = '{config.models.catalog}': file not found")
    if config.worker.default_max_tokens > config.worker.context_size:
        problems.append(f"worker.default_max_tokens = {config.worker.default_max_tokens}: must not exceed "
                        f"worker.context_size ({config.worker.context_size})")
    mem, thermal = config.memory, config.thermal
    if mem.critical_mib >= mem.low_mib and mem.low_mib > 0:
        problems.append(f"memory.critical_mib = {mem.critical_mib}: must be below memory.low_mib ({mem.low_mib})")
    if thermal.soft_token_delay * 4 > config.worker.stall_timeout:
        problems.append(f"thermal.soft_token_delay = {thermal.soft_token_delay}: must be well below "
                        f"worker.stall_timeout ({config.worker.stall_timeout}), or a warm board looks stuck")
    if thermal.hard_limit <= thermal.soft_limit:
        problems.append(f"thermal.hard_limit = {thermal.hard_limit}: must be above thermal.soft_limit "
                        f"({thermal.soft_limit})")
    return problems + _home_checks(config)


def _home_checks(config: Config) -> list[str]:
    problems = []
    ha, wyoming = config.homeassistant, config.wyoming
    if ha.discovery and not config.mqtt.enabled:
        problems.append("homeassistant.discovery = true: needs MQTT, but mqtt.enabled is false")
    if ha.discovery and config.supervisor.telemetry_interval == 0:
        problems.append("homeassistant.discovery = true: the sensors read the telemetry topic, but "
                        "supervisor.telemetry_interval is 0 (no telemetry)")
    if ha.status_topic and any(c in ha.status_topic for c in "+#\0"):
        problems.append(f"homeassistant.status_topic = {ha.status_topic!r}: must be a topic without wildcards")
    if wyoming.enabled and not is_loopback(wyoming.bind) and not wyoming.allow_anonymous:
        problems.append(f"wyoming.bind = {wyoming.bind!r}: not a loopback address, and Wyoming clients cannot "
                        f"present a credential; set wyoming.allow_anonymous = true to serve it anyway (anyone who "
                        f"reaches the port can use the model; narrow it with wyoming.allowed_clients)")
    return problems


def is_loopback(address: str) -> bool:
    """Whether a listen address reaches this device only (a host name other than localhost counts as not)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _http_checks(config: Config) -> list[str]:
    h = config.http
    if h.api_key_file is not None:
        if (reason := secret_file_problem(h.api_key_file, api_key_problem)) is not None:
            return [f"{_shown('http', 'api_key_file', h.api_key_file)}: {reason}"]
    elif h.enabled and not h.allow_anonymous and not is_loopback(h.bind):
        return [f"http.bind = {h.bind!r} serves the network without a key: set http.api_key_file (a file holding "
                f"the key), or bind to 127.0.0.1, or set http.allow_anonymous = true to let anyone who can reach "
                f"the port use the API"]
    return []


def read_secret(path: Path) -> str:
    """First line of a secret file, stripped."""
    text = path.read_text().strip()
    return text.splitlines()[0].strip() if text else ""


