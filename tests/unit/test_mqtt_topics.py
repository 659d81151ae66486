"""Request topics that end in the sender's account name (the shipped ACL's %u patterns)."""

from __future__ import annotations

from appliance.transports.mqtt_session import Topics

T = Topics.of("appliance", "pi-07", "appliance")


def test_requester_is_the_last_level_of_a_request_topic():
    assert T.requester("appliance/pi-07/generate/sensor1") == ("appliance/pi-07/generate", "sensor1")
    assert T.requester("appliance/fleet/generate/sensor1") == ("appliance/fleet/generate", "sensor1")
    assert T.requester("appliance/pi-07/cancel/app") == ("appliance/pi-07/cancel", "app")
    assert T.requester("appliance/pi-07/infer/activity/sensor1") == ("appliance/pi-07/infer/activity", "sensor1")


def test_plain_and_malformed_topics_name_no_requester():
    assert T.requester("appliance/pi-07/generate") == ("appliance/pi-07/generate", None)
    assert T.requester("appliance/pi-07/infer/activity") == ("appliance/pi-07/infer/activity", None)
    assert T.requester("appliance/pi-07/generate/a/b")[1] is None  # one level only
    assert T.requester("appliance/pi-07/generate/")[1] is None
    assert T.requester("appliance/pi-07/status") == ("appliance/pi-07/status", None)
