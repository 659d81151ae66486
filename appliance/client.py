"""`appliance ask`: a small client for both transports, useful from a shell and as a worked example."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.transports.mqtt_session import disable_nagle


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    error: dict | None = None


def parse_host_port(value: str, default_port: int = 1883) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value or "127.0.0.1", default_port
    return host or "127.0.0.1", int(port)


def ask_http(base_url: str, body: dict, *, chat: bool, api_key: str | None = None,
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
    except urllib.error.HTTPError as exc:
        try:
            answer.error = json.load(exc).get("error")
        except ValueError:
            answer.error = {"code": "http", "message": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError) as exc:
        answer.error = {"code": "connection", "message": str(getattr(exc, "reason", exc))}
    return answer


def get_status(base_url: str, *, api_key: str | None = None, timeout: float = 10) -> dict:
    """GET /status; on failure a dict with an "error" key."""
    if not base_url.startswith(("http://", "https://")):
        return {"error": {"message": f"not an http(s) URL: {base_url}"}}
    req = urllib.request.Request(base_url.rstrip("/") + "/status")  # noqa: S310 - scheme checked above
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return {"error": {"message": f"HTTP {exc.code}"}}
    except (urllib.error.URLError, OSError) as exc:
        return {"error": {"message": f"cannot reach {base_url}: {getattr(exc, 'reason', exc)}"}}


def format_status(status: dict) -> str:
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


def ask_mqtt(host: str, port: int, topic: str, body: dict, *, protocol: str = "5", username: str | None = None,
             password: str | None = None, reply_prefix: str = "appliance/client",
             on_delta: Callable[[str], None] = lambda s: None, timeout: float = 600) -> Answer:
    """Publish one request to ``topic`` and wait for its final reply on a private reply topic."""
    client_id = f"ask-{uuid.uuid4().hex[:12]}"
    reply_topic = f"{reply_prefix}/{client_id}/reply"
    correlation = uuid.uuid4().bytes
    v5 = protocol == "5"
    body = {"id": uuid.uuid4().hex, **body}
    if not v5:
        body["reply_to"] = reply_topic
    answer, done, subscribed = Answer(), threading.Event(), threading.Event()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    if username:
        client.username_pw_set(username, password)

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            answer.error = {"code": "connection", "message": f"broker refused the connection: {reason_code}"}
            done.set()
            return
        disable_nagle(c)
        c.subscribe(reply_topic, qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(c, userdata, msg):
        props = getattr(msg, "properties", None)
        if v5 and getattr(props, "CorrelationData", None) != correlation:
            return
        reply = json.loads(msg.payload)
        if not v5 and reply.get("id") != body["id"]:
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

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        return Answer(error={"code": "connection", "message": f"cannot reach {host}:{port}: {exc}"})
    client.loop_start()
    try:
        if not subscribed.wait(10):
            return answer if answer.error else Answer(error={"code": "connection", "message": "no SUBACK"})
        props = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = reply_topic, correlation
        client.publish(topic, json.dumps(body), qos=1, properties=props)
        if not done.wait(timeout):
            answer.error = {"code": "timeout", "message": f"no reply within {timeout:.0f} s"}
    finally:
        client.disconnect()
        client.loop_stop()
    return answer
