"""Topic names and paho client construction for the MQTT transport.

Two connections per device:
- the *device* session: persistent (``clean_start=False`` + ``mqtt.session_expiry``), subscribed to this device's
  topics, carrying the Last Will; the broker keeps requests for the device while it is down;
- the *fleet* session: ``mqtt.fleet_session_expiry`` (default 0, ends at disconnect), member of the shared fleet
  subscription. mosquitto hands shared-subscription messages round-robin to every member session, offline ones
  included, and drops what an expired session held; a short-lived session keeps a device that is down from being
  handed fleet work.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import Config, read_secret
from appliance.protocol import reply_topic_problem
from appliance.transports.mqtt_journal import Accepted

#: the root of every requester's reply tree: a user may only be answered under replies/<user>/ (the shipped ACL)
REPLY_ROOT = "replies"


@dataclass(frozen=True)
class Topics:
    """Every topic of one device (``<prefix>/<device>/...``) and of the fleet it belongs to."""

    generate: str
    cancel: str
    status: str
    telemetry: str
    reply: str  # replies to requests that name no reply topic
    infer_prefix: str  # + a tensor model's id
    embed: str  # embedding requests (tensors/embed_api.py)
    fleet_generate: str
    fleet_share: str  # the shared subscription to fleet_generate
    fleet_cancel: str

    def requester(self, topic: str) -> tuple[str, str | None]:
        """Split a request or cancel topic that ends in its sender's user name (``<p>/<d>/generate/<user>``,
        ``<p>/<d>/infer/<model>/<user>``; the broker's ``%u`` ACL lets each account write only its own) into the
        plain topic and the user; a topic without one gives ``(topic, None)``."""
        for base in (self.generate, self.cancel, self.embed, self.fleet_generate, self.fleet_cancel):
            if topic.startswith(base + "/") and "/" not in (user := topic[len(base) + 1:]) and user:
                return base, user
        if topic.startswith(self.infer_prefix):
            model, _, user = topic[len(self.infer_prefix):].partition("/")
            if user and "/" not in user:
                return self.infer_prefix + model, user
        return topic, None

    @classmethod
    def of(cls, prefix: str, device: str, group: str) -> Topics:
        own, fleet = f"{prefix}/{device}", f"{prefix}/fleet"
        return cls(generate=f"{own}/generate", cancel=f"{own}/cancel", status=f"{own}/status",
                   telemetry=f"{own}/telemetry", reply=f"{own}/reply", infer_prefix=f"{own}/infer/",
                   embed=f"{own}/embed",
                   fleet_generate=f"{fleet}/generate", fleet_share=f"$share/{group}/{fleet}/generate",
                   fleet_cancel=f"{fleet}/cancel")


def new_properties(packet_type: int) -> Properties:
    """MQTT v5 properties for one packet type (paho's constructor carries no annotations)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def make_client(config: Config, client_id: str, *, persistent: bool) -> paho.Client:
    """A paho 2.x client (VERSION2 callbacks, manual acks) with credentials and TLS from the config."""
    m = config.mqtt
    if m.protocol == "5":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, manual_ack=True, protocol=paho.MQTTv5)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, manual_ack=True,
                             protocol=paho.MQTTv311, clean_session=not persistent)
    client.enable_logger(logging.getLogger("paho"))
    client.suppress_exceptions = True  # second line of defence; the transport's _guard() is the first
    if m.username:
        client.username_pw_set(m.username, read_secret(m.password_file) if m.password_file else None)
    if m.tls:
        client.tls_set(ca_certs=str(m.ca_file) if m.ca_file else None,
                       certfile=str(m.cert_file) if m.cert_file else None,
                       keyfile=str(m.key_file) if m.key_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def disable_nagle(client: paho.Client) -> None:
    """Send small packets at once. paho leaves Nagle's algorithm on, and with the broker's delayed ACKs every small
    reply then waits ~40 ms; call from on_connect."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_async(client: paho.Client, config: Config, host: str, port: int, *, session_expiry: int,
                  receive_maximum: int | None = None) -> None:
    """Connect in the background; paho keeps retrying (with back-off) until the broker answers.

    ``receive_maximum`` (v5): the broker sends at most this many QoS 1 requests that are not yet acked; the rest
    stay with the broker until an answer frees a place (flow control, docs/protocol.md). paho sends none itself."""
    if config.mqtt.protocol == "5":
        props = new_properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        client.connect_async(host, port, keepalive=config.mqtt.keepalive, clean_start=session_expiry == 0,
                             properties=props)
    else:
        client.connect_async(host, port, keepalive=config.mqtt.keepalive)
    client.loop_start()


def asked_reply_topic(msg: paho.MQTTMessage, body: object, v5: bool) -> str | None:
    """The reply topic a request (or a cancel) names: the v5 Response Topic, else a valid ``reply_to`` field."""
    props = getattr(msg, "properties", None) if v5 else None
    response_topic = getattr(props, "ResponseTopic", None) if props else None
    reply_to = body.get("reply_to") if isinstance(body, dict) else None
    return response_topic or (reply_to if reply_topic_problem(reply_to) is None else None)


class ReplayedMessage(paho.MQTTMessage):
    """A request the delivery journal kept across a restart, handed to ``on_message`` once more. QoS 0: there is
    no delivery of it to ack (a redelivery by the broker joins it and is acked when it is answered)."""


def replayed_message(request: Accepted, v5: bool) -> ReplayedMessage:
    msg = ReplayedMessage(mid=0, topic=request.topic.encode())
    msg.payload, msg.qos = request.payload, 0
    if v5:
        props = new_properties(PacketTypes.PUBLISH)
        if request.response_topic is not None:
            props.ResponseTopic = request.response_topic
        if request.correlation is not None:
            props.CorrelationData = request.correlation
        msg.properties = props
    return msg
