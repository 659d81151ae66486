"""MQTT transport: requests in, streamed chunks and final replies out, status retained (paho-mqtt 2.x).

Topics (``<p>`` = ``mqtt.topic_prefix``, ``<d>`` = ``device.id``)::

    <p>/<d>/generate        requests for this device
    <p>/fleet/generate      requests for any device (joined as $share/<group>/<p>/fleet/generate)
    <p>/<d>/embed           embedding requests (an embedder in the catalog); <p>/<d>/infer/<model> tensor models
    <p>/<d>/cancel          {"id": ...}: stops that request of the same requester; <p>/fleet/cancel on every device
    <p>/<d>/status          retained state; the Last Will sets "offline"
    <p>/<d>/reply           replies to requests that name no reply topic

Replies go to the v5 Response Topic with the Correlation Data echoed byte for byte, else to the request's
``reply_to`` (3.1.1), else to ``<p>/<d>/reply``. paho's network thread only parses and hands over; it never
waits for inference. Every callback is guarded so an exception is logged and counted, never lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.config import Config
from appliance.errors import ApplianceError, BadRequest, Cancelled
from appliance.generation.scheduler import Requester, Scheduler
from appliance.json_input import decode_json
from appliance.metrics import Metrics
from appliance.protocol import (
    dumps,
    parse_generate,
    request_id,
)
from appliance.status import Status, StatusBoard
from appliance.tensors import embed_api
from appliance.tensors.pool import InferencePool
from appliance.transports.ha_discovery import Discovery, board_model
from appliance.transports.mqtt_acks import AckBook, StoredReply, handed_back
from appliance.transports.mqtt_cancels import EarlyCancels
from appliance.transports.mqtt_journal import JOURNAL_DIR, Accepted, DeliveryJournal, Ticket
from appliance.transports.mqtt_reply import MqttReply
from appliance.transports.mqtt_session import (
    REPLY_ROOT,
    ReplayedMessage,
    Topics,
    asked_reply_topic,
    connect_async,
    disable_nagle,
    make_client,
    new_properties,
    replayed_message,
)
from appliance.transports.mqtt_waiting import Held, Waiting

log = logging.getLogger(__name__)


class MqttTransport:
    def __init__(self, config: Config, scheduler: Scheduler, status: StatusBoard, metrics: Metrics,
                 infer: InferencePool | None = None, telemetry: Callable[[], dict[str, Any]] = dict) -> None:
        self.infer = infer
        self._telemetry = telemetry  # the supervisor's latest reading
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.topics = Topics.of(config.mqtt.topic_prefix, config.device.id, config.mqtt.fleet_group)
        self.journal = DeliveryJournal(config.device.state_dir / JOURNAL_DIR,
                                       keep_answered=config.mqtt.dedupe_window) if config.mqtt.journal else None
        self._unanswered = list(self.journal.unanswered) if self.journal else []  # answered again once connected
        self.acks = AckBook(window=config.mqtt.dedupe_window,
                            on_answered=self.journal.answered if self.journal else None)
        self.waiting = Waiting(lambda exc: scheduler.record_error("mqtt", exc))
        self.early_cancels = EarlyCancels(ttl=config.worker.request_timeout)
        self._v5 = config.mqtt.protocol == "5"
        self._accepting = True
        self._closed = False
        self.connected = threading.Event()
        self._status = status
        self.client = make_client(config, config.mqtt_client_id, persistent=True)
        offline = dumps({**status.current.to_dict(), "state": "offline", "reason": "connection lost"})
        self.client.will_set(self.topics.status, offline, qos=1, retain=True)
        self.fleet_client = None
        if config.mqtt.fleet:
            self.fleet_client = make_client(config, f"{config.mqtt_client_id}-fleet",
                                            persistent=config.mqtt.fleet_session_expiry > 0)
        for client in filter(None, (self.client, self.fleet_client)):
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            client.on_subscribe = self._on_subscribe
        status.subscribe(self._publish_status)
        self.discovery = Discovery(config, self.topics, self._publish_discovery, self._republish_state,
                                   board_model())
        logging.getLogger("paho").addFilter(self._quiet_after_close)

    def _quiet_after_close(self, record: logging.LogRecord) -> bool:
        # paho 2.2's network thread may run once more after a clean disconnect and log "Client is not connected"
        # at ERROR; after our own close() that is expected, not an error.
        return not (self._closed and record.getMessage().startswith("Client is not connected"))

    def start(self, host: str, port: int) -> None:
        window = self.config.worker.max_queue + self.config.worker.parallel
        log.info("MQTT: connecting to %s:%d as %s (MQTT %s%s)", host, port, self.config.mqtt_client_id,
                 self.config.mqtt.protocol, f", receive maximum {window}" if self._v5 else "")
        # flow control: the broker holds what the queue cannot take (worker.parallel running + worker.max_queue
        # waiting), so a backlog it kept while the appliance was down is answered, not refused with busy
        connect_async(self.client, self.config, host, port, session_expiry=self.config.mqtt.session_expiry,
                      receive_maximum=window)
        if self.fleet_client is not None:
            connect_async(self.fleet_client, self.config, host, port,
                          session_expiry=self.config.mqtt.fleet_session_expiry)

    def stop_accepting(self) -> None:
        """New requests are left unacked from now on, so the broker redelivers them after the restart."""
        self._accepting = False
        self.waiting.close()

    def close(self) -> None:
        """Publish ``offline``, disconnect cleanly, stop the network thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        self.waiting.close()
        self.discovery.close()
        if self.connected.is_set():
            info = self.publish(self.topics.status, {**self._status.current.to_dict(), "state": "offline",
                                                     "reason": "shut down"}, retain=True)
            with contextlib.suppress(ValueError, RuntimeError):
                info.wait_for_publish(timeout=3)
        for client in filter(None, (self.fleet_client, self.client)):
            client.disconnect()
            client.loop_stop()
        if self.journal is not None:
            self.journal.close()

    # -- callbacks (paho's network thread) ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, where: str) -> Iterator[None]:
        try:
            yield
        except Exception:
            self.metrics.callback_errors.inc()
            log.exception("MQTT %s callback failed", where)

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        with self._guard("on_connect"):
            which = "fleet" if client is self.fleet_client else "device"
            if reason_code.is_failure:
                log.error("MQTT (%s session): broker refused the connection: %s", which, reason_code)
                return
            log.info("MQTT (%s session): connected (session present: %s)", which, flags.session_present)
            disable_nagle(client)
            # Subscribe every time: Debian's mosquitto 2.0.11 does not restore $share subscriptions of durable
            # sessions, and a session may have expired. No retained requests: they would rerun on every reconnect.
            # Requests at QoS 1 (they count against the Receive Maximum); cancels and Home Assistant's birth at
            # QoS 0, so they are never held back behind a window full of requests.
            topics: list[tuple[str, int]]
            # Each also with a last level naming the requester's account (the shipped ACL's %u patterns).
            if client is self.fleet_client:
                topics = [(self.topics.fleet_share, 1), (self.topics.fleet_share + "/+", 1),
                          (self.topics.fleet_cancel, 0), (self.topics.fleet_cancel + "/+", 0)]
            else:
                topics = [(self.topics.generate, 1), (self.topics.generate + "/+", 1),
                          (self.topics.cancel, 0), (self.topics.cancel + "/+", 0)]
                if self.infer is not None and self.infer.models:
                    topics += [(self.topics.infer_prefix + "+", 1), (self.topics.infer_prefix + "+/+", 1)]
                if self.infer is not None and self.infer.embedders:
                    topics += [(self.topics.embed, 1), (self.topics.embed + "/+", 1)]
                if self.discovery.enabled:
                    topics.append((self.discovery.birth_topic, 0))
            if self._v5:
                client.subscribe([(t, SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
                                  for t, qos in topics])
            else:
                client.subscribe(topics)
            if client is self.client:
                self.publish(self.topics.status, self._status.current.to_dict(), retain=True)
                self.discovery.on_connect()
                self.connected.set()
                # before the broker's redeliveries of them come in on this connection: those join them
                unanswered, self._unanswered = self._unanswered, []
                for request in unanswered:
                    log.info("MQTT: answering a request accepted before the restart (%s)", request.topic)
                    self._on_message(client, None, replayed_message(request, self._v5))

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._guard("on_disconnect"):
            if client is self.client:
                self.connected.clear()
            if not self._closed:
                log.warning("MQTT: disconnected (%s); reconnecting", reason_code)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._guard("on_subscribe"):
            which = "fleet" if client is self.fleet_client else "device"
            refused = [code for code in reason_codes if code.is_failure]
            for code in refused:
                log.error("MQTT (%s session): broker refused a subscription: %s", which, code)
            if not refused:  # from here on a request published to the session's topics reaches the appliance
                log.info("MQTT (%s session): subscribed", which)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        with self._guard("on_publish"):
            if reason_code.is_failure:
                log.error("MQTT: broker refused a publish (mid %d): %s", mid, reason_code)
            self._ack(self.acks.puback(mid))

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._guard("on_message"):
            if msg.topic == self.discovery.birth_topic and self.discovery.enabled:
                self.discovery.on_birth(bytes(msg.payload))
                self._ack({(client, msg.mid, msg.qos)})
            elif msg.retain:  # a retained request would be answered again on every reconnect
                log.warning("MQTT: ignoring a retained message on %s", msg.topic)
                self._ack({(client, msg.mid, msg.qos)})
            elif (route := self.topics.requester(msg.topic))[0] in (self.topics.generate, self.topics.fleet_generate):
                self._on_request(client, msg, self._generate, route[1])
            elif route[0].startswith(self.topics.infer_prefix) and (infer := self.infer) is not None:
                model_id = route[0][len(self.topics.infer_prefix):]
                self._on_request(client, msg, lambda body, reply: infer.submit(
                    model_id, body, lambda answer: reply.tensor_answer(request_id(body), answer), "mqtt"), route[1])
            elif route[0] == self.topics.embed and (pool := self.infer) is not None:
                self._on_request(client, msg, lambda body, reply: self._embed(pool, body, reply), route[1])
            elif route[0] in (self.topics.cancel, self.topics.fleet_cancel):
                self._on_cancel(msg, route[1])
                self._ack({(client, msg.mid, msg.qos)})
            else:
                self._ack({(client, msg.mid, msg.qos)})

    def _generate(self, body: object, reply: MqttReply) -> None:
        self.scheduler.submit(parse_generate(body), reply, "mqtt", reply.requester)

    def _embed(self, infer: InferencePool, body: object, reply: MqttReply) -> None:
        request = embed_api.mqtt_request(body)
        infer.embed(request, lambda answer: reply.tensor_answer(request.id, answer), "mqtt")

    def _on_request(self, client: paho.Client, msg: paho.MQTTMessage,
                    handle: Callable[[object, MqttReply], None], user: str | None) -> None:
        """Decode, deduplicate and hand over one request; ``handle(body, reply)`` submits it or raises. A request
        sent by ``user`` (its topic's last level, enforced by the broker's ACL) is answered under
        ``replies/<user>/`` only: a reply topic elsewhere is refused, so no client can steer answers to another."""
        props = getattr(msg, "properties", None) if self._v5 else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        body: object = None
        problem: ApplianceError | None = None
        try:
            body = decode_json(bytes(msg.payload), limit=self.config.mqtt.max_payload)
        except BadRequest as exc:
            problem = exc
        rid = request_id(body) if isinstance(body, dict) else None
        asked = asked_reply_topic(msg, body, self._v5)
        topic = asked or self.topics.reply
        if user is not None:
            own = f"{REPLY_ROOT}/{user}/"
            topic = asked if asked and asked.startswith(own) else own + self.config.device.id
            if asked and not asked.startswith(own) and problem is None:
                problem = BadRequest(f"replies to account {user!r} go under {own}..., not to {asked!r}",
                                     param="reply_to")
        key: tuple[object, ...]
        if correlation is not None:
            key = (topic, "cd", bytes(correlation))
        elif rid is not None:
            key = (topic, "id", rid)
        else:  # no id at all: the payload tells a redelivery of the same message
            key = (topic, "sha", hashlib.sha256(msg.payload).hexdigest())
        delivery = (client, msg.mid, msg.qos)
        replayed = isinstance(msg, ReplayedMessage)
        # the delivery journal keeps the device session's QoS 1 requests (fleet ones are the fleet's to retry)
        journalled = self.journal is not None and client is self.client and (msg.qos > 0 or replayed)
        ticket = Ticket.of(key, bytes(msg.payload)) if journalled else None
        recalled = (handed_back(self.journal.recall, ticket, self.acks, key, delivery)
                    if self.journal is not None and ticket is not None and not replayed else None)
        if recalled is not None:
            # handed back after a restart (DUP set or not: mosquitto re-queues from its last save): answered once
            log.info("MQTT: request %r from before the restart handed back (%s, DUP %d)", rid, recalled, msg.dup)
            self.metrics.mqtt_redeliveries.labels("answered" if recalled == "answered" else "in_progress").inc()
            if recalled == "answered":
                self._ack({delivery})
            return
        seen = self.acks.begin(key, delivery, redelivery=bool(msg.dup))
        if seen.pending is not None and seen.state == "new" and ticket is not None and self.journal is not None:
            seen.pending.ticket = ticket
            if not replayed:  # on the card before it is worked on; acked only once its answer is recorded
                self.journal.accepted(Accepted(ticket, msg.topic, bytes(msg.payload),
                                               getattr(props, "ResponseTopic", None), correlation))
        if seen.state != "new":
            self.metrics.mqtt_redeliveries.labels(seen.state).inc()
        if seen.state == "in_progress":
            log.info("MQTT: redelivery of request %r, which is in progress: answered once", rid)
            return
        assert seen.pending is not None
        if seen.state == "answered" and (stored := seen.pending.reply) is not None:
            log.info("MQTT: redelivery of request %r, already answered: its reply is sent again", rid)
            info = self.publish(stored.topic, stored.payload, stored.correlation,
                                expiry=self.config.mqtt.reply_expiry)
            self._ack(self.acks.reply_sent(seen.pending, info.mid, stored))
            return
        # the requester, as its cancels name it: the broker-checked account, else where its replies go
        requester = Requester(account=user) if user is not None else Requester(reply_to=topic)
        reply = MqttReply(self, topic, correlation, seen.pending, requester=requester,
                          stream=bool(isinstance(body, dict) and body.get("stream")), fleet=client is self.fleet_client)
        if not self._accepting:
            reply.abandon(rid)
            return
        if problem is None and rid is not None and self.early_cancels.take(rid, requester):
            problem = Cancelled(f"request {rid!r} was cancelled before it reached the queue")
        if problem is None and client is self.client:  # for this device alone: it waits for a place, never busy
            self.waiting.offer(Held(rid, requester, lambda: handle(body, reply), reply))
            return
        try:
            if problem is not None:
                raise problem
            handle(body, reply)
        except ApplianceError as exc:
            self.scheduler.record_error("mqtt", exc)
            log.info("MQTT: request %r refused: %s", rid, exc.code)
            reply.refuse(rid, exc)

    def _on_cancel(self, msg: paho.MQTTMessage, user: str | None) -> None:
        """Stop the request with this id of the same requester (on ``.../cancel/<user>`` the account, else the reply
        destination the cancel names, as the request did) wherever it is, or when it arrives (mqtt_cancels.py)."""
        try:
            body = decode_json(bytes(msg.payload), limit=4096)
        except BadRequest as exc:
            log.warning("MQTT: ignoring a cancel: %s", exc.message)
            return
        rid = request_id(body) if isinstance(body, dict) else None
        if rid is None:
            log.warning("MQTT: ignoring a cancel without a valid 'id'")
            return
        requester = Requester(account=user) if user is not None else \
            Requester(reply_to=asked_reply_topic(msg, body, self._v5) or self.topics.reply)
        window = self.config.worker.max_queue + self.config.worker.parallel
        window_full = self.scheduler.outstanding + len(self.waiting) >= window
        if not self.waiting.cancel(rid, requester) and window_full:  # the broker may hold the request still
            self.early_cancels.keep(rid, requester)
        self.scheduler.cancel(rid, requester)

    # -- publishing (any thread) -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: dict[str, Any] | bytes, correlation: bytes | None = None, *,
                retain: bool = False, expiry: int = 0) -> paho.MQTTMessageInfo:
        props = None
        if self._v5:
            props = new_properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry:
                props.MessageExpiryInterval = expiry
        data = payload if isinstance(payload, bytes) else dumps(payload)
        return self.client.publish(topic, data, qos=1, retain=retain, properties=props)

    def answer(self, reply: MqttReply, payload: dict[str, Any]) -> None:
        """Publish a final reply; the request is acked once the broker has the reply."""
        data = dumps(payload)
        info = self.publish(reply.topic, data, reply.correlation, expiry=self.config.mqtt.reply_expiry)
        self._ack(self.acks.reply_sent(reply.pending, info.mid, StoredReply(reply.topic, reply.correlation, data)))
        if len(self.waiting):
            self.waiting.drain()

    @staticmethod
    def _ack(acks: set[tuple[paho.Client, int, int]]) -> None:
        """Acknowledge requests, each on the connection that delivered it."""
        for client, mid, qos in acks:
            if qos > 0:
                client.ack(mid, qos)

    def publish_telemetry(self, payload: dict[str, Any]) -> None:
        if not self._closed:
            self.publish(self.topics.telemetry, payload, retain=True)

    def _publish_discovery(self, topic: str, payload: dict[str, Any] | None) -> None:
        if payload is None:  # an empty retained message removes the entity from Home Assistant
            self.client.publish(topic, b"", qos=1, retain=True)
        else:
            self.publish(topic, payload, retain=True)

    def _republish_state(self) -> None:
        self._publish_status(self._status.current)
        if telemetry := self._telemetry():
            self.publish_telemetry(telemetry)

    def _publish_status(self, status: Status) -> None:
        if not self._closed:
            self.publish(self.topics.status, status.to_dict(), retain=True)
