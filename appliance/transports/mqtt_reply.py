"""The sink of one MQTT request: what the scheduler or the tensor pool says about it becomes chunk, result and
error messages on the request's reply topic, and the request's ack is released once its answer is out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.errors import ApplianceError, Busy, Cancelled
from appliance.generation.scheduler import Job, Requester
from appliance.messages import Abandoned, Chunk, Done, Failed, JobEvent
from appliance.protocol import EmbedResult, chunk_payload, error_payload, result_payload, tensor_result_payload
from appliance.tensors import embed_api
from appliance.tensors.pool import Answer
from appliance.transports.mqtt_acks import Pending

if TYPE_CHECKING:
    from appliance.transports.mqtt import MqttTransport


class MqttReply:
    """The sink of one MQTT job: publishes chunks, then the result or error, then releases the request's ack."""

    def __init__(self, transport: MqttTransport, topic: str, correlation: bytes | None, pending: Pending,
                 stream: bool, fleet: bool, requester: Requester) -> None:
        self.transport, self.topic, self.correlation, self.pending = transport, topic, correlation, pending
        self.stream, self.fleet, self.requester = stream, fleet, requester

    def send(self, job: Job, event: JobEvent) -> None:
        rid = job.request.id
        match event:
            case Chunk(seq=seq, text=text) if self.stream:
                self.transport.publish(self.topic, chunk_payload(rid, seq, text), self.correlation,
                                       expiry=self.transport.config.mqtt.reply_expiry)
            case Done(completion=completion):
                self.transport.answer(self, result_payload(rid, completion, job.request.structured,
                                                                 job.request.tools))
            case Failed(error=error):
                if isinstance(error, Cancelled):  # a cancel kept for a request yet to come found this one
                    self.transport.early_cancels.forget(rid, self.requester)
                self.refuse(rid, error)
            case Abandoned():
                self.abandon(rid)

    def refuse(self, rid: str | int | None, error: ApplianceError) -> None:
        self.transport.answer(self, error_payload(rid, error))

    def tensor_answer(self, rid: str | int | None, answer: Answer) -> None:
        if isinstance(answer, ApplianceError):
            self.refuse(rid, answer)
        elif isinstance(answer, EmbedResult):
            self.transport.answer(self, embed_api.mqtt_payload(answer))
        else:
            self.transport.answer(self, tensor_result_payload(answer))

    def abandon(self, rid: str | int | None) -> None:
        """The appliance is stopping before it could answer."""
        if self.fleet and self.transport.config.mqtt.fleet_session_expiry == 0:
            # the fleet session ends with this connection, so the broker will not deliver it again: say so
            self.refuse(rid, Busy("this device is shutting down; send the request again"))
        else:
            self.transport.acks.forget(self.pending)  # unacked: the broker delivers it again after the restart
