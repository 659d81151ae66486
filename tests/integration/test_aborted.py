"""Deliberate stops are not crashes (issue 10.3): 20 requests in a row cancelled while the engine evaluates a long
prompt in one batch, with a cancel_grace far shorter than that batch, get the worker killed again and again; the
device is `ready` afterwards and answers the next request. On the old code the sixth kill (worker.max_restarts = 5)
left the status at `error` for good."""

from __future__ import annotations

import json
import time
import uuid

PROMPT = " ".join(f"word{i}" for i in range(450))  # ~3200 tokens, evaluated in one 4096-token batch


def test_twenty_aborted_requests_leave_the_device_ready(appliance_factory, mqtt_client):
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "batch_size": 4096, "cancel_grace": 0.1,
                                                "max_restarts": 5, "restart_window": 300}})
    client = mqtt_client()
    prefix = f"test/aborted/{uuid.uuid4().hex}"
    client.subscribe(prefix + "/#")
    for n in range(20):
        app.wait_status(lambda s: s["state"] == "ready", timeout=60)
        rid = f"a{n}"
        client.publish(app.topic("generate"), {"id": rid, "prompt": PROMPT, "max_tokens": 50},
                       response_topic=f"{prefix}/{rid}", correlation=rid.encode())
        time.sleep(0.3)  # accepted and evaluating the prompt
        client.cancel(app.topic("cancel"), rid, f"{prefix}/{rid}")
        (final,) = client.wait_for(lambda m, t=f"{prefix}/{rid}": m.topic == t, timeout=60)
        assert json.loads(final.payload)["error"]["code"] in ("cancelled", "worker_crashed"), final.payload
    kills = app.log_text().count("because a request did not stop within worker.cancel_grace")
    assert kills > 5, f"only {kills} of 20 aborts needed a kill: the test did not exercise the restart limit"
    status = app.wait_status(lambda s: s["state"] == "ready", timeout=60)
    assert status["state"] == "ready"
    ok = client.request(app.topic("generate"), {"prompt": "after", "max_tokens": 3})
    assert ok[-1]["type"] == "result"
