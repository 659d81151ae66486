"""What other threads put in the scheduler's inbox (the scheduler thread alone acts on them; see scheduler.py)."""

from __future__ import annotations

from appliance.errors import ApplianceError
from appliance.generation.jobs import Job, Requester
from appliance.generation.slot import FromWorker
from appliance.messages import message
from appliance.supervisor.policies import Conditions


@message
class Moderating:
    job: Job  # accepted, now with the moderation gate (with no filter, a Submit follows at once)


@message
class Submit:
    job: Job  # accepted, and through the moderation gate


@message
class CancelRequest:
    request_id: str | int  # every job of this request id and requester, at whatever stage (the MQTT cancel topic)
    requester: Requester


@message
class CancelJob:
    job: Job
    error: ApplianceError


@message
class NewConditions:
    conditions: Conditions


@message
class Stop:
    pass


#: what waits in the scheduler's inbox
Command = Moderating | Submit | CancelRequest | CancelJob | NewConditions | Stop | FromWorker
