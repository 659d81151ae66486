"""Run the real appliance as a subprocess (`python -m appliance serve`) against a real broker, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import toml_text as toml
from appliance.transports.broker import free_port
from appliance.transports.mqtt_session import disable_nagle

REPO = Path(__file__).resolve().parents[2]
#: the worker settings the real default model runs with in the tests (and its llama-cpp-python reference)
DEFAULT_MODEL_WORKER = {"context_size": 2048, "batch_size": 256, "threads": 2}


def run_cli(*args: str, env: dict | None = None, timeout: float = 180,
            input: str | None = None) -> subprocess.CompletedProcess:  # noqa: A002 (subprocess's name)
    """``python -m appliance ARGS`` from this checkout, ``input`` on its stdin."""
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def toml_text(data: dict) -> str:
    """A config file of ``[section]`` tables."""
    return "".join("\n".join(toml.table(section, values)) + "\n\n" for section, values in data.items())


def merge(base: dict, extra: dict) -> dict:
    result = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        result.setdefault(section, {}).update(values)
    return result


def http_get(url: str, *, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: dict | bytes, *, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@dataclass
class Appliance:
    """One `appliance serve` process. ``device`` is unique per instance, so tests sharing a broker don't mix."""

    workdir: Path
    config: dict
    env_extra: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_start: int = 0  # where this start's lines begin in the log (a restart appends to it)

    @property
    def device(self) -> str:
        return self.config["device"]["id"]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http']['port']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.device}.log"

    def topic(self, leaf: str) -> str:
        prefix = self.config.get("mqtt", {}).get("topic_prefix", "appliance")
        return f"{prefix}/{self.device}/{leaf}"

    def start(self, *, wait: bool = True, timeout: float = 60) -> Appliance:
        config_path = self.workdir / f"{self.device}.toml"
        config_path.write_text(toml_text(self.config))
        env = {**os.environ, **self.env_extra}
        env.pop("APPLIANCE_DEBUG", None)
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("ab") as log:
            self.log_start = log.tell()
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "-c", str(config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        if wait:
            self.wait_ready(timeout)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60) -> None:
        self.readyz_until("ready", timeout=timeout)
        self.wait_subscribed()

    def wait_subscribed(self, timeout: float = 10) -> None:
        """/readyz says ready once the model is loaded; the MQTT sessions connect and subscribe just after, and a
        request published before that reaches no subscriber and is dropped by the broker (seen on a loaded CI
        machine: 0.25 s between the two). Wait for the sessions' "subscribed" lines in this start's log; give up
        quietly after ``timeout`` s, as a test that stopped the broker on purpose expects no subscription."""
        mqtt = self.config.get("mqtt", {})
        level = self.config.get("logging", {}).get("level", "info")
        if not mqtt.get("enabled", True) or level not in ("info", "debug"):
            return  # no MQTT, or a log that leaves those lines out
        sessions = ["device", "fleet"] if mqtt.get("fleet", True) else ["device"]
        wanted = [f"MQTT ({which} session): subscribed" for which in sessions]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                text = log.read().decode(errors="replace")
            if all(line in text for line in wanted):
                return
            time.sleep(0.05)

    def readyz_until(self, state: str, *, timeout: float = 60, headers: dict | None = None) -> list[tuple[int, dict]]:
        """Poll /readyz until it reports ``state``; returns every distinct (HTTP status, body) seen on the way."""
        seen: list[tuple[int, dict]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                status, body = http_get(self.http_url + "/readyz", headers=headers, timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            observed = (status, json.loads(body))
            if not seen or seen[-1] != observed:
                seen.append(observed)
            if observed[1].get("status") == state:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"/readyz never said {state!r} within {timeout} s (saw {seen}):\n"
                           f"{self.log_text()[-3000:]}")

    def status(self) -> dict:
        return json.loads(http_get(self.http_url + "/status")[1])

    def wait_status(self, predicate, timeout: float = 20) -> dict:
        """Poll /status until ``predicate(status)`` holds; returns that status."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"status never matched within {timeout} s; last: {status}")

    def metric(self, line_start: str) -> float | None:
        for line in http_get(self.http_url + "/metrics")[1].decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def new_appliance(workdir: Path, broker_port: int | None, catalog: Path, default: str, overrides: dict | None = None,
                  env: dict | None = None) -> Appliance:
    device = f"t{uuid.uuid4().hex[:8]}"
    base = {
        "device": {"id": device, "state_dir": str(workdir / device)},
        "mqtt": {"host": "127.0.0.1", "port": broker_port or 1, "keepalive": 5, "enabled": broker_port is not None},
        "http": {"port": free_port()},
        "models": {"catalog": str(catalog), "default": default},
        # a long generation of the "slow" model on a loaded 2-core machine can run past a minute: the tests that
        # want a timeout set their own
        "worker": {"threads": 2, "context_size": 512, "max_queue": 4, "request_timeout": 300},
        "logging": {"level": "info"},
    }
    return Appliance(workdir, merge(base, overrides or {}), env or {})


def finals_by_id(messages, prefix: str = "") -> dict[str, list[dict]]:
    """The final replies (result or error) among MQTT messages on topics under ``prefix``, per request id."""
    out: dict[str, list[dict]] = {}
    for m in messages:
        if m.topic.startswith(prefix) and (body := json.loads(m.payload))["type"] in ("result", "error"):
            out.setdefault(body["id"], []).append(body)
    return out


def chunks_by_id(messages, prefix: str = "") -> dict[str, int]:
    """How many streamed chunks each request id got among MQTT messages on topics under ``prefix``."""
    out: dict[str, int] = {}
    for m in messages:
        if m.topic.startswith(prefix) and (body := json.loads(m.payload))["type"] == "chunk":
            out[body["id"]] = out.get(body["id"], 0) + 1
    return out


def wait_until(condition, what: str, timeout: float) -> None:
    """Poll ``condition`` every 0.1 s (MqttClient.wait_for runs its predicate on every message, too slow over a
    stream of chunks); AssertionError naming ``what`` past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


class MqttClient:
    """A paho client for tests that records everything it receives."""

    def __init__(self, host: str, port: int, *, protocol: str = "5", client_id: str | None = None,
                 username: str | None = None, password: str | None = None, tls_ca: Path | None = None,
                 session_expiry: int = 0) -> None:
        """``session_expiry`` > 0 (MQTT v5): a persistent session, resumed when the same ``client_id`` connects
        again: the broker keeps its subscriptions and queues QoS 1 messages for it while it is away."""
        self.v5 = protocol == "5"
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:10]}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311)
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self._connected, self._subacks = threading.Event(), set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self._refused = None
        if session_expiry:
            assert self.v5, "persistent sessions here are MQTT v5's"
            session = Properties(PacketTypes.CONNECT)
            session.SessionExpiryInterval = session_expiry
            self.client.connect(host, port, keepalive=30, clean_start=False, properties=session)
        else:
            self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10) or self._refused:
            self.client.loop_stop()
            raise ConnectionRefusedError(f"test MQTT client could not connect: {self._refused}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        disable_nagle(client)
        self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        result, mid = self.client.subscribe(topic, qos=qos)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout=10):
                raise TimeoutError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str | dict, *, response_topic: str | None = None,
                correlation: bytes | None = None, qos: int = 1, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if self.v5 and (response_topic or correlation is not None):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=props).wait_for_publish(10)

    def cancel(self, topic: str, rid: str, reply_topic: str | None) -> None:
        """Cancel request ``rid`` as its requester: naming the same reply topic (v5 Response Topic, 3.1.1
        ``reply_to``); None names none, as a request that leaves its replies to the device's default topic."""
        if self.v5:
            self.publish(topic, {"id": rid}, response_topic=reply_topic)
        else:
            self.publish(topic, {"id": rid, **({"reply_to": reply_topic} if reply_topic else {})})

    def wait_for(self, predicate, timeout: float = 30, count: int = 1) -> list[paho.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"only {len(found)} of {count} expected messages within {timeout} s; "
                                       f"received: {[(m.topic, m.payload[:200]) for m in self.messages][-10:]}")
                self._cond.wait(remaining)

    def replies(self, topic: str, *, correlation: bytes | None = None, rid=None, timeout: float = 30) -> list[dict]:
        """All replies for one request up to and including its final one (result or error)."""
        def mine(m) -> bool:
            if m.topic != topic:
                return False
            props = getattr(m, "properties", None)
            if correlation is not None and getattr(props, "CorrelationData", None) != correlation:
                return False
            return rid is None or json.loads(m.payload).get("id") == rid

        def final(m) -> bool:
            return mine(m) and json.loads(m.payload).get("type") in ("result", "error")

        self.wait_for(final, timeout)
        return [json.loads(m.payload) for m in self.messages if mine(m)]

    def request(self, topic: str, body: dict | bytes, *, timeout: float = 60, correlation: bytes | None = None,
                reply_topic: str | None = None) -> list[dict]:
        """Send one request and return every reply to it (chunks then the final one)."""
        reply_topic = reply_topic or f"test/{self.client_id}/{uuid.uuid4().hex[:8]}"
        self.subscribe(reply_topic)
        if self.v5:
            correlation = correlation if correlation is not None else uuid.uuid4().bytes
            self.publish(topic, body, response_topic=reply_topic, correlation=correlation)
            return self.replies(reply_topic, correlation=correlation, timeout=timeout)
        body = dict(body)
        body.setdefault("id", uuid.uuid4().hex)
        body["reply_to"] = reply_topic
        self.publish(topic, body)
        return self.replies(reply_topic, rid=body["id"], timeout=timeout)

    def forget(self) -> None:
        """Drop what was recorded and unsubscribe the topics it came on: a client that sends requests for a long
        time (bench/soak.py) would otherwise pile them up, in itself and in the broker's subscription table."""
        with self._cond:
            topics = {m.topic for m in self.messages}
            self.messages.clear()
        for topic in topics:
            self.client.unsubscribe(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FakeBoard:
    """Fake /proc/meminfo, /proc/pressure/memory, thermal zone and `vcgencmd` for the supervisor to read."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.meminfo, self.psi, self.temp = directory / "meminfo", directory / "psi", directory / "temp"
        self.throttled = directory / "throttled"
        self.bin = directory / "bin"
        self.bin.mkdir(exist_ok=True)
        vcgencmd = self.bin / "vcgencmd"  # found on PATH, as on a Pi
        vcgencmd.write_text(f'#!/bin/sh\n[ "$1" = get_throttled ] || exit 2\n'
                            f'echo "throttled=$(cat {self.throttled})"\n')
        vcgencmd.chmod(0o755)
        self.set_memory(4096)
        self.set_temperature(45.0)
        self.set_throttled(0)

    def set_memory(self, available_mib: float, *, total_mib: int = 8192, psi_some: float = 0.0,
                   psi_full: float = 0.0) -> None:
        kb = int(available_mib * 1024)
        self._write(self.meminfo, f"MemTotal:       {total_mib * 1024} kB\nMemFree:        {kb // 2} kB\n"
                                  f"MemAvailable:   {kb} kB\nSwapTotal:      1048576 kB\nSwapFree:       1000000 kB\n")
        self._write(self.psi, f"some avg10={psi_some:.2f} avg60=0.00 avg300=0.00 total=0\n"
                              f"full avg10={psi_full:.2f} avg60=0.00 avg300=0.00 total=0\n")

    def set_temperature(self, celsius: float) -> None:
        self._write(self.temp, f"{int(celsius * 1000)}\n")

    def set_throttled(self, value: int) -> None:
        self._write(self.throttled, f"{value:#x}\n")

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # readers never see half a file

    def overrides(self) -> dict:
        return {
            "memory": {"meminfo_path": str(self.meminfo), "psi_path": str(self.psi)},
            "thermal": {"sensor_file": str(self.temp), "throttle_interval": 0.2},
            "supervisor": {"interval": 0.2, "telemetry_interval": 1.0},
            "gpio": {"pin_factory": "mock"},
        }

    def env(self) -> dict:
        return {"PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}


def in_process_service(workdir: Path, catalog: Path, overrides: dict):
    """A Service built in this process (to reach its mock pins or its notifier), HTTP only, model `tiny`."""
    from appliance.config import load_config
    from appliance.service import Service, load_catalog
    config_file = workdir / "in-process.toml"
    config_file.write_text(toml_text(merge({
        "device": {"id": f"p{uuid.uuid4().hex[:8]}", "state_dir": str(workdir / "state")},
        "mqtt": {"enabled": False}, "http": {"port": free_port()},
        "models": {"catalog": str(catalog), "default": "tiny"}, "worker": {"threads": 2, "context_size": 512},
    }, overrides)))
    config = load_config(config_file, env={})
    return Service(config, load_catalog(config))
