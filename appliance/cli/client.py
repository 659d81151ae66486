"""`appliance ask`: a small client for both transports, useful from a shell and as a worked example."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.transports.mqtt_session import disable_nagle, new_properties


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    interrupted: bool = False  # Ctrl-C stopped it (and, over MQTT, a cancel went to the device)


CANCEL_CONFIRM_S = 10


def parse_host_port(value: str, default_port: int = 1883) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value or "127.0.0.1", default_port
    return host or "127.0.0.1", int(port)


def ask_http(base_url: str, body: dict[str, Any], *, chat: bool, api_key: str | None = None,
             on_delta: Callable[[str], None] = lambda s: None, timeout: float = 600) -> Answer:
    if not base_url.startswith(("http://", "https://")):
        return Answer(error={"code": "bad_request", "message": f"not an http(s) URL: {base_url}"})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req = urllib.request.Request(base_url.rstrip("/") + path, data=json.dumps(body).encode(),  # noqa: S310
                                 method="POST", headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    answer = Answer()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            if not body.get("stream"):
                data = json.load(resp)
                choice = data["choices"][0]
                answer.text = choice["message"]["content"] if chat else choice["text"]
                answer.finish_reason, answer.usage = choice["finish_reason"], data.get("usage")
                answer.timings = data.get("timings")
                return answer
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    answer.error = event["error"]
                    break
                if event.get("usage"):
                    answer.usage, answer.timings = event["usage"], event.get("timings")
                for choice in event.get("choices", []):
                    delta = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if delta:
                        answer.text += delta
                        on_delta(delta)
                    if choice.get("finish_reason"):
                        answer.finish_reason = choice["finish_reason"]
    except KeyboardInterrupt:  # leaving the `with` closed the connection: the appliance cancels the request
        answer.interrupted = True
        answer.error = {"code": "cancelled", "message": "stopped (Ctrl-C); closing the connection cancelled it"}
    except urllib.error.HTTPError as exc:
        try:
            answer.error = json.load(exc).get("error")
        except ValueError:
            answer.error = {"code": "http", "message": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError) as exc:
        answer.error = {"code": "connection", "message": str(getattr(exc, "reason", exc))}
    return answer


class Asker(Protocol):
    """Where `ask` and `chat` send requests: HttpAsker or MqttAsker."""

    def connect(self) -> dict[str, Any] | None: ...
    def close(self) -> None: ...
    def ask(self, body: dict[str, Any], *, on_delta: Callable[[str], None] = ..., timeout: float = ...) -> Answer: ...
    def models(self) -> list[str] | None: ...
    def status(self) -> dict[str, Any]: ...


class HttpAsker:
    """The HTTP side of `appliance ask` and `appliance chat`: the same interface as MqttAsker."""

    def __init__(self, base_url: str, *, api_key: str | None = None, chat: bool = True) -> None:
        self.base_url, self.api_key, self.chat = base_url, api_key, chat

    def __str__(self) -> str:
        return self.base_url

    def connect(self) -> dict[str, Any] | None:
        return None  # a connection per request

    def close(self) -> None:
        pass

    def ask(self, body: dict[str, Any], *, on_delta: Callable[[str], None] = lambda s: None,
            timeout: float = 600) -> Answer:
        if body.get("stream"):
            body = {**body, "stream_options": {"include_usage": True}}  # usage and timings in the last event
        return ask_http(self.base_url, body, chat=self.chat, api_key=self.api_key, on_delta=on_delta,
                        timeout=timeout)

    def models(self) -> list[str] | None:
        """Model ids the appliance serves (GET /v1/models); None when it cannot be asked."""
        listed = get_json(self.base_url, "/v1/models", api_key=self.api_key)
        return None if "error" in listed else [m["id"] for m in listed.get("data", [])]

    def status(self) -> dict[str, Any]:
        return get_status(self.base_url, api_key=self.api_key)


def get_json(base_url: str, path: str, *, api_key: str | None = None, timeout: float = 10) -> dict[str, Any]:
    """GET ``path`` (``/status``, ``/v1/models``); on failure a dict with an "error" key."""
    if not base_url.startswith(("http://", "https://")):
        return {"error": {"message": f"not an http(s) URL: {base_url}"}}
    req = urllib.request.Request(base_url.rstrip("/") + path)  # noqa: S310 - scheme checked above
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            status: dict[str, Any] = json.load(resp)
            return status
    except urllib.error.HTTPError as exc:
        return {"error": {"message": f"HTTP {exc.code}"}}
    except (urllib.error.URLError, OSError) as exc:
        return {"error": {"message": f"cannot reach {base_url}: {getattr(exc, 'reason', exc)}"}}


def get_status(base_url: str, *, api_key: str | None = None, timeout: float = 10) -> dict[str, Any]:
    """GET /status; on failure a dict with an "error" key."""
    return get_json(base_url, "/status", api_key=api_key, timeout=timeout)


def format_status(status: dict[str, Any]) -> str:
    """A few lines for a person."""
    t = status.get("telemetry") or {}
    lines = [f"{status.get('device')}: {status.get('state')}"
             + (f" ({status['reason']})" if status.get("reason") else "")
             + f", model {status.get('model') or '-'}, appliance {status.get('version')}"]
    lines += [f"  warning: {w}" for w in status.get("warnings", [])]
    release = status.get("release") or {}
    if release:
        trial = release.get("trial")
        lines.append(f"  release {release.get('name')} (previous {release.get('previous') or '-'})"
                     + (f", on trial: start {trial['start']} of {trial['of']}" if trial else ""))
    if t.get("temperature_c") is not None:
        lines.append(f"  temperature {t['temperature_c']:.1f} °C ({t.get('thermal')})")
    if t.get("throttle"):
        lines.append(f"  throttle flags {t['throttle']['raw']}: {', '.join(t['throttle']['flags']) or 'none'}")
    memory = t.get("memory")
    if memory:
        psi = "" if memory.get("psi_some_avg10") is None else \
            f", PSI some {memory['psi_some_avg10']}% full {memory['psi_full_avg10']}%"
        lines.append(f"  memory {memory['available_mib']:.0f} of {memory['total_mib']:.0f} MiB available "
                     f"({memory['level']}{psi})")
    if t.get("worker_rss_mib") is not None:
        lines.append(f"  worker RSS {t['worker_rss_mib']:.0f} MiB, {t['worker']['threads']} threads"
                     + (f", {t['worker']['token_delay_s']} s between tokens" if t['worker']['token_delay_s'] else ""))
    lines.append(f"  requests outstanding {status.get('outstanding', 0)} ({t.get('queue_depth', 0)} waiting), "
                 f"last {t.get('tokens_per_s', 0)} tok/s")
    return "\n".join(lines)


class MqttAsker:
    """One MQTT connection that asks a topic and waits for each final reply on a private reply topic; ``ask`` may be
    called again and again (`appliance chat`), and a request it is waiting for can be cancelled on the device."""

    def __init__(self, host: str, port: int, topic: str, *, protocol: str = "5", username: str | None = None,
                 password: str | None = None, reply_prefix: str = "appliance/client") -> None:
        self.host, self.port, self.topic = host, port, topic
        self.cancel_topic = topic.rsplit("/", 1)[0] + "/cancel"  # <prefix>/<device or fleet>/cancel
        self.v5 = protocol == "5"
        client_id = f"ask-{uuid.uuid4().hex[:12]}"
        self.reply_topic = f"{reply_prefix}/{client_id}/reply"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311)
        if username:
            self._client.username_pw_set(username, password)
        self._ready = threading.Event()  # subscribed, or refused
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Answer, threading.Event, Callable[[str], None], bytes]] = {}
        self._client.on_connect, self._client.on_subscribe = self._on_connect, self._on_subscribe
        self._client.on_message = self._on_message

    def connect(self, timeout: float = 10) -> dict[str, Any] | None:
        """Connect and subscribe to the reply topic; an error dict when that failed, else None."""
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            return {"code": "connection", "message": f"cannot reach {self.host}:{self.port}: {exc}"}
        self._client.loop_start()
        if not self._ready.wait(timeout) or self._refused:
            return {"code": "connection", "message": self._refused or "no SUBACK"}
        return None

    def __str__(self) -> str:
        return f"MQTT {self.host}:{self.port} {self.topic}"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def models(self) -> list[str] | None:
        return None  # MQTT has no listing: a wrong id gets unknown_model on the next request

    def status(self) -> dict[str, Any]:
        return {}

    def _on_connect(self, c: paho.Client, userdata: object, flags: paho.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._refused = f"broker refused the connection: {reason_code}"
            self._ready.set()
            return
        disable_nagle(c)
        c.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, c: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        self._ready.set()

    def _on_message(self, c: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            return  # not ours: our reply topic only carries the appliance's JSON
        with self._lock:
            rid = reply.get("id") if isinstance(reply, dict) else None
            waiting = self._pending.get(rid) if isinstance(rid, str) else None
        if waiting is None:
            return
        answer, done, on_delta, correlation = waiting
        if self.v5 and getattr(getattr(msg, "properties", None), "CorrelationData", None) != correlation:
            return
        if reply.get("type") == "chunk":
            answer.text += reply["delta"]
            on_delta(reply["delta"])
            return
        if "error" in reply:
            answer.error = reply["error"]
        else:
            answer.text = reply["text"]
            answer.finish_reason, answer.usage = reply["finish_reason"], reply["usage"]
            answer.timings = reply.get("timings")
        done.set()

    def ask(self, body: dict[str, Any], *, on_delta: Callable[[str], None] = lambda s: None,
            timeout: float = 600) -> Answer:
        """Publish one request and wait for its final reply. On KeyboardInterrupt (Ctrl-C) the request is cancelled
        on the device, whose ``cancelled`` reply (when it comes within a few seconds) is the returned answer."""
        body = {"id": uuid.uuid4().hex, **body}
        answer, done, correlation = Answer(), threading.Event(), uuid.uuid4().bytes
        if not self.v5:
            body["reply_to"] = self.reply_topic
        with self._lock:
            self._pending[body["id"]] = (answer, done, on_delta, correlation)
        props = None
        if self.v5:
            props = new_properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = self.reply_topic, correlation
        try:
            self._client.publish(self.topic, json.dumps(body), qos=1, properties=props)
            try:
                if not done.wait(timeout):
                    answer.error = {"code": "timeout", "message": f"no reply within {timeout:.0f} s"}
            except KeyboardInterrupt:
                self._pending[body["id"]] = (answer, done, lambda s: None, correlation)  # no more text shown
                # the device stops only its requester's requests: the cancel names the same reply destination
                self._client.publish(self.cancel_topic, json.dumps({"id": body["id"], "reply_to": self.reply_topic}),
                                     qos=1, properties=props)
                if not done.wait(CANCEL_CONFIRM_S):
                    answer.error = {"code": "cancelled", "message": "cancel sent; the device did not confirm it "
                                    f"within {CANCEL_CONFIRM_S} s"}
                answer.interrupted = True
        finally:
            with self._lock:
                self._pending.pop(body["id"], None)
        return answer


def ask_mqtt(host: str, port: int, topic: str, body: dict[str, Any], *, protocol: str = "5",
             username: str | None = None, password: str | None = None, reply_prefix: str = "appliance/client",
             on_delta: Callable[[str], None] = lambda s: None, timeout: float = 600) -> Answer:
    """Publish one request to ``topic`` and wait for its final reply on a private reply topic."""
    asker = MqttAsker(host, port, topic, protocol=protocol, username=username, password=password,
                      reply_prefix=reply_prefix)
    error = asker.connect()
    try:
        return Answer(error=error) if error else asker.ask(body, on_delta=on_delta, timeout=timeout)
    finally:
        asker.close()
