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


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str
    group: str

    @property
    def generate(self) -> str:
        return f"{self.prefix}/{self.device}/generate"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/{self.device}/cancel"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device}/status"

    @property
    def infer_prefix(self) -> str:
        """``<prefix>/<device>/infer/`` + a tensor model's id."""
        return f"{self.prefix}/{self.device}/infer/"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/{self.device}/telemetry"

    @property
    def reply(self) -> str:
        return f"{self.prefix}/{self.device}/reply"

    @property
    def fleet_generate(self) -> str:
        return f"{self.prefix}/fleet/generate"

    @property
    def fleet_share(self) -> str:
        return f"$share/{self.group}/{self.fleet_generate}"

    @property
    def fleet_cancel(self) -> str:
        return f"{self.prefix}/fleet/cancel"


def make_client(config: Config, client_id: str, *, persistent: bool) -> paho.Client:
    """A paho 2.x client (VERSION2 callbacks, manual acks) with credentials and TLS from the config."""
    m = config.mqtt
    if m.protocol == "5":
        kwargs = {"protocol": paho.MQTTv5}
    else:
        kwargs = {"protocol": paho.MQTTv311, "clean_session": not persistent}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, manual_ack=True, **kwargs)
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


def connect_async(client: paho.Client, config: Config, host: str, port: int, *, session_expiry: int) -> None:
    """Connect in the background; paho keeps retrying (with back-off) until the broker answers."""
    if config.mqtt.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        client.connect_async(host, port, keepalive=config.mqtt.keepalive, clean_start=session_expiry == 0,
                             properties=props)
    else:
        client.connect_async(host, port, keepalive=config.mqtt.keepalive)
    client.loop_start()
