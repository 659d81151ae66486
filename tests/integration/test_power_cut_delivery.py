"""Exactly-once across a power cut (issue 12.3): the appliance and mosquitto (persistence on) are both killed with
SIGKILL while requests are answered, running and queued; after both restart, every request the sensor had a PUBACK
for gets exactly one final reply.

mosquitto acks a publisher before it saves anything and saves its whole memory at intervals, so after a cut it comes
back with the state of its last save: requests accepted since then are gone (docs/operations.md: what autosave costs
and buys), and requests answered since then are handed to the device again. Here the save is taken (SIGUSR1, what
the autosave timer does) once every request is accepted and before the answers are acked, so the broker hands back
answered ones: without the delivery journal they were answered twice."""

from __future__ import annotations

import base64
import signal
import stat
import time
import uuid
from pathlib import Path

import psutil
import pytest

from appliance.transports.broker import Mosquitto, free_port
from tests.support.harness import MqttClient, chunks_by_id, finals_by_id, new_appliance, wait_until

#: more than the appliance takes at once (mosquitto 2.0.11 sends up to twice the Receive Maximum of 5): some stay
#: queued in the broker, some wait in the appliance
REQUESTS = 14


def _save_now(broker: Mosquitto) -> None:
    """SIGUSR1: mosquitto writes its in-memory database now, as its autosave would."""
    db = broker.data_dir / "mosquitto.db"
    before = db.stat().st_mtime_ns if db.exists() else 0
    assert broker._process is not None
    broker._process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not (db.exists() and db.stat().st_mtime_ns > before):
        assert time.monotonic() < deadline, "mosquitto did not save on SIGUSR1"
        time.sleep(0.02)


def _power_cut(app, broker: Mosquitto) -> None:
    """Every process at once: the appliance, its worker (left alone it would run on and log a broken pipe), the
    broker."""
    service = psutil.Process(app.proc.pid)
    for process in [service, *service.children(recursive=True)]:
        process.kill()
    assert broker._process is not None
    broker._process.kill()
    app.proc.wait(10)
    broker._process.wait(10)
    broker._process = None


@pytest.mark.timeout(600)
def test_requests_accepted_before_a_power_cut_are_answered_exactly_once(tmp_path, catalog_path):
    broker = Mosquitto(tmp_path / "broker", free_port(), persistence=True)
    broker.start()
    # the slow model, one at a time: answers come seconds apart, so the cut falls while one is running
    app = new_appliance(tmp_path, broker.port, catalog_path, "slow", {"worker": {"max_queue": 4}})
    clients: list[MqttClient] = []
    try:
        app.start()
        sensor = MqttClient(broker.host, broker.port)
        clients.append(sensor)
        prefix = f"test/cut/{uuid.uuid4().hex}"
        sensor.subscribe(prefix + "/#")
        ids = [f"c{n}" for n in range(REQUESTS)]
        for rid in ids:  # publish() returns once the broker's PUBACK is in: accepted
            sensor.publish(app.topic("generate"), {"id": rid, "prompt": f"request {rid}", "max_tokens": 100,
                                                   "stream": True}, response_topic=f"{prefix}/{rid}",
                           correlation=rid.encode())
        _save_now(broker)

        def mid_flight() -> bool:  # two answered, and the third several chunks into its run
            messages = list(sensor.messages)
            finals, chunks = finals_by_id(messages, prefix), chunks_by_id(messages, prefix)
            return len(finals) >= 2 and any(n >= 4 and rid not in finals for rid, n in chunks.items())

        wait_until(mid_flight, "two answered and one running", 240)
        _power_cut(app, broker)
        before = list(sensor.messages)
        answered_before = set(finals_by_id(before, prefix))
        running = set(chunks_by_id(before, prefix)) - answered_before
        assert len(answered_before) >= 2 and running and len(answered_before | running) < REQUESTS, \
            (sorted(answered_before), sorted(running))  # some answered, one running, some queued
        sensor.close()
        clients.remove(sensor)

        killed_log = len(app.log_text())
        broker.start()
        requester = MqttClient(broker.host, broker.port)  # listens on the reply topics again
        clients.append(requester)
        requester.subscribe(prefix + "/#")
        app.start(timeout=120)
        wait_until(lambda: len(finals_by_id(before + list(requester.messages), prefix)) == REQUESTS,
                    "a final reply to every request", 240)
        time.sleep(3)  # an answer given twice would come now
        finals = finals_by_id(before + requester.messages, prefix)
        assert sorted(finals) == sorted(ids)
        twice = {rid: [f["type"] for f in v] for rid, v in finals.items() if len(v) != 1}
        assert not twice, f"answered more than once: {twice}"
        assert all(v[0]["type"] == "result" for v in finals.values()), finals
        log = app.log_text()[killed_log:]
        # the broker did hand back answered requests from its save: the journal is what kept them from a second run
        assert "from before the restart handed back (answered" in log, log[-3000:]
        assert "answering a request accepted before the restart" in log, log[-3000:]
        assert not [line for line in log.splitlines() if "Traceback" in line or "callback failed" in line]
    finally:
        for client in clients:
            client.close()
        app.kill()
        broker.stop()


def test_the_journal_keeps_prompts_only_until_answered_and_skips_a_torn_record(appliance_factory, mqtt_client):
    app = appliance_factory()
    client = mqtt_client()
    assert client.request(app.topic("generate"), {"prompt": "private words", "max_tokens": 2})[-1]["type"] == "result"
    journal = Path(app.config["device"]["state_dir"]) / "mqtt-journal"
    wait_until(lambda: (journal / "requests").stat().st_size == 0, "the answered request's record removed", 10)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o700
    for name in ("requests", "answered"):
        assert stat.S_IMODE((journal / name).stat().st_mode) == 0o600
    answered = (journal / "answered").read_bytes()
    assert answered and b"private" not in answered and base64.b64encode(b"private")[:8] not in answered
    assert app.stop() == 0
    with (journal / "requests").open("ab") as f:  # the power went while a record was being written
        f.write(b"\x00\x00\x01\x00\x12\x34\x56\x78{\"kind\": \"acc")
    app.start()
    assert "skipped 21 bytes of a torn record" in app.log_text()
    assert client.request(app.topic("generate"), {"prompt": "after", "max_tokens": 2})[-1]["type"] == "result"
