"""The supervisor against a real appliance process: fake /proc and /sys files and a fake `vcgencmd` on PATH drive
the memory and thermal policies through every level and back, while real requests run on tiny real models."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import psutil
import pytest

from appliance.backends.probe import MiB
from tests.support.harness import FakeBoard, http_get, merge


@pytest.fixture
def board(tmp_path):
    return FakeBoard(tmp_path / "board")


def _start(appliance_factory, board, default="slow", extra=None):
    overrides = merge(board.overrides(), {"worker": {"context_size": 4096}})
    return appliance_factory(default, merge(overrides, extra or {}), env=board.env())


def _warnings(status: dict) -> str:
    return " | ".join(status["warnings"])


def test_memory_low_critical_and_recovered(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, extra={"memory": {"low_mib": 500, "critical_mib": 200,
                                                             "hysteresis_mib": 100}})
    client = mqtt_client()
    topic = app.topic("generate")

    board.set_memory(450)  # low
    app.wait_status(lambda s: "memory low: 450 MiB" in _warnings(s) and s["state"] == "ready")
    refused = client.request(topic, {"prompt": "a", "max_tokens": 3, "priority": "low"})[-1]
    assert refused["error"]["code"] == "busy" and "memory low" in refused["error"]["message"]
    assert client.request(topic, {"prompt": "a", "max_tokens": 3})[-1]["type"] == "result"

    board.set_memory(560)  # above low, but within the hysteresis: still low
    time.sleep(1.0)
    assert "memory low: 560 MiB" in _warnings(app.status())

    reply_topic = f"test/mem/{uuid.uuid4().hex}"
    client.subscribe(reply_topic)
    client.publish(topic, {"id": "long", "prompt": "a", "max_tokens": 4000, "stream": True},
                   response_topic=reply_topic, correlation=b"long")
    client.wait_for(lambda m: m.topic == reply_topic)  # generating
    board.set_memory(150)  # critical
    final = client.replies(reply_topic, timeout=15)[-1]
    assert final["error"]["code"] == "memory" and "memory critical" in final["error"]["message"]
    status = app.wait_status(lambda s: s["state"] == "degraded" and s["model"] is None)
    assert "memory critical: 150 MiB" in status["reason"]
    assert app.metric('appliance_model_loaded{model="slow"}') is None
    assert http_get(app.http_url + "/readyz")[0] == 503
    refused = client.request(topic, {"prompt": "a", "max_tokens": 3})[-1]
    assert refused["error"]["code"] == "busy" and "memory critical" in refused["error"]["message"]

    board.set_memory(260)  # above critical, within the hysteresis: still critical
    time.sleep(1.0)
    assert app.status()["state"] == "degraded"

    board.set_memory(2000)  # recovered: the model is loaded again
    app.wait_status(lambda s: s["state"] == "ready" and s["model"] == "slow" and not s["warnings"])
    assert client.request(topic, {"prompt": "a", "max_tokens": 3})[-1]["type"] == "result"
    assert app.metric('appliance_condition{kind="memory",level="normal"}') == 1.0


def test_memory_pressure_from_psi(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, "tiny", {"memory": {"psi_low": 40, "psi_critical": 30}})
    board.set_memory(4096, psi_some=55.0)
    app.wait_status(lambda s: "PSI some avg10 55.0%" in _warnings(s))
    board.set_memory(4096, psi_some=60.0, psi_full=45.0)
    app.wait_status(lambda s: s["state"] == "degraded" and "PSI full avg10 45.0%" in s["reason"])
    board.set_memory(4096)
    app.wait_status(lambda s: s["state"] == "ready")


def test_thermal_soft_hard_and_back(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, extra={"thermal": {"soft_limit": 70, "hard_limit": 80, "hysteresis": 5,
                                                              "soft_max_tokens": 8, "soft_token_delay": 0.02}})
    client = mqtt_client()
    topic = app.topic("generate")

    board.set_temperature(72)  # soft: fewer threads, a rest between tokens, shorter answers
    status = app.wait_status(lambda s: "warm: 72.0 °C" in _warnings(s))
    assert status["state"] == "ready"
    worker = app.wait_status(lambda s: s["telemetry"].get("worker", {}).get("token_delay_s"))["telemetry"]["worker"]
    assert worker == {"threads": 1, "token_delay_s": 0.02}
    capped = client.request(topic, {"prompt": "a", "max_tokens": 50})[-1]
    assert capped["usage"]["completion_tokens"] == 8

    board.set_temperature(45)  # back to normal below soft - hysteresis
    app.wait_status(lambda s: not s["warnings"] and s["telemetry"]["worker"]["token_delay_s"] == 0)
    reply_topic = f"test/hot/{uuid.uuid4().hex}"
    client.subscribe(reply_topic)
    client.publish(topic, {"id": "long", "prompt": "a", "max_tokens": 3000, "stream": True},
                   response_topic=reply_topic, correlation=b"long")
    client.wait_for(lambda m: m.topic == reply_topic)

    board.set_temperature(85)  # hard: the running generation pauses, new requests get `thermal`
    status = app.wait_status(lambda s: s["state"] == "degraded")
    assert "too hot: 85.0 °C" in status["reason"]
    def chunks() -> int:
        return len([m for m in client.messages if m.topic == reply_topic])

    # tokens already on their way still arrive (many, on a loaded machine): wait for a quiet second, then the
    # generation must stay paused
    deadline, seen = time.monotonic() + 30, -1
    while seen != chunks() and time.monotonic() < deadline:
        seen = chunks()
        time.sleep(1.0)
    time.sleep(1.5)
    assert chunks() == seen, "generation must pause"
    refused = client.request(topic, {"prompt": "a", "max_tokens": 3})[-1]
    assert refused["error"]["code"] == "thermal" and "too hot" in refused["error"]["message"]

    board.set_temperature(77)  # below hard but within the hysteresis: still paused
    time.sleep(1.0)
    assert app.status()["state"] == "degraded"

    board.set_temperature(50)  # cool again: the paused generation finishes
    final = client.replies(reply_topic, timeout=300)[-1]  # 3000 tokens: a minute or more on a loaded machine
    assert final["type"] == "result" and final["usage"]["completion_tokens"] == 3000
    app.wait_status(lambda s: s["state"] == "ready")


def test_throttle_flags_from_vcgencmd(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, "tiny")
    client = mqtt_client()
    client.subscribe(app.topic("telemetry"))
    board.set_throttled(0x50005)  # under-voltage and throttled now, and both have occurred
    status = app.wait_status(lambda s: "under-voltage now" in _warnings(s))
    assert status["state"] == "ready" and "throttling the CPU" in _warnings(status)
    assert set(status["telemetry"]["throttle"]["flags"]) == {"under_voltage", "throttled", "under_voltage_occurred",
                                                             "throttled_occurred"}
    assert app.metric('appliance_throttle{flag="under_voltage"}') == 1.0
    (msg,) = client.wait_for(lambda m: m.topic == app.topic("telemetry")
                             and "under_voltage" in (json.loads(m.payload)["throttle"] or {}).get("flags", []))
    telemetry = json.loads(msg.payload)
    assert telemetry["temperature_c"] == 45.0 and telemetry["memory"]["available_mib"] == 4096
    assert telemetry["worker_rss_mib"] > 0 and telemetry["model"] == "tiny"
    board.set_throttled(0x50000)  # only "has occurred" bits
    status = app.wait_status(lambda s: "under-voltage has occurred since boot" in _warnings(s))
    assert "under-voltage now" not in _warnings(status)


def test_telemetry_and_gauges_carry_the_board_readings(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board)
    board.set_memory(3000, psi_some=12.5, psi_full=3.25)  # below the PSI thresholds: readings, not a level change
    board.set_temperature(52.5)
    client = mqtt_client()
    client.subscribe(app.topic("telemetry"))
    reply_topic = f"test/tele/{uuid.uuid4().hex}"
    client.subscribe(reply_topic + "/#")
    for rid in ("running", "queued-1", "queued-2"):
        client.publish(app.topic("generate"), {"id": rid, "prompt": "a", "max_tokens": 4000, "stream": True},
                       response_topic=f"{reply_topic}/{rid}", correlation=rid.encode())
        if rid == "running":
            client.wait_for(lambda m: m.topic == f"{reply_topic}/running")  # generating: the others wait

    def telemetry(predicate):
        return json.loads(client.wait_for(lambda m: m.topic == app.topic("telemetry")
                                          and predicate(json.loads(m.payload)))[-1].payload)

    busy = telemetry(lambda t: t["queue_depth"] == 2)
    assert busy["outstanding"] == 3, busy  # waiting + running
    assert app.metric("appliance_queue_depth") == 2.0
    for rid in ("queued-2", "queued-1", "running"):
        client.cancel(app.topic("cancel"), rid, f"{reply_topic}/{rid}")
        assert client.replies(f"{reply_topic}/{rid}", timeout=20)[-1]["error"]["code"] == "cancelled"

    done = client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 16})[-1]
    speed = done["timings"]["tokens_per_s"]
    assert speed > 0
    idle = telemetry(lambda t: t["tokens_per_s"] == speed)
    assert idle["queue_depth"] == 0 and idle["outstanding"] == 0
    assert idle["temperature_c"] == 52.5
    assert idle["memory"]["available_mib"] == 3000 and idle["memory"]["level"] == "normal"
    assert idle["memory"]["psi_some_avg10"] == 12.5 and idle["memory"]["psi_full_avg10"] == 3.25
    assert abs(app.metric("appliance_tokens_per_second") - speed) <= 0.005  # the reply rounds to 0.01

    assert app.metric("appliance_cpu_temperature_celsius") == 52.5
    assert app.metric("appliance_memory_available_bytes") == 3000 * MiB
    assert app.metric('appliance_memory_pressure_avg10{kind="some"}') == 12.5
    assert app.metric('appliance_memory_pressure_avg10{kind="full"}') == 3.25
    # the worker's RSS is the real process's, read on each tick: the gauge and the payload agree up to drift
    rss = app.metric("appliance_worker_rss_bytes") / MiB
    assert idle["worker_rss_mib"] > 0 and abs(rss - idle["worker_rss_mib"]) < max(8.0, 0.1 * rss), (rss, idle)


def test_memory_admission_refuses_what_does_not_fit(appliance_factory, mqtt_client, board):
    """tiny needs ~131 MiB with the default margin, slow ~189 MiB: a 160 MiB budget takes one, not the other."""
    app = _start(appliance_factory, board, "tiny", {"memory": {"budget_mib": 160}})
    client = mqtt_client()
    refused = client.request(app.topic("generate"), {"model": "slow", "prompt": "a", "max_tokens": 3})[-1]
    message = refused["error"]["message"]
    assert refused["error"]["code"] == "memory"
    assert "needs about 189 MiB" in message and "160 MiB are available (memory.budget_mib)" in message
    assert "worker.context_size" in message and "memory.budget_mib" in message
    assert client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 3})[-1]["type"] == "result"
    assert app.status()["state"] == "ready"


def test_default_model_refused_by_admission_is_degraded(appliance_factory, board):
    app = appliance_factory("slow", merge(board.overrides(), {"memory": {"budget_mib": 160},
                                                               "worker": {"context_size": 4096}}),
                            env=board.env(), start=False).start(wait=False)
    status, body = app.readyz_until("degraded")[-1]
    assert status == 503 and "needs about 189 MiB" in body["reason"]


def test_crash_loop_ends_in_error(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, "tiny", {"worker": {"max_restarts": 2, "restart_window": 120}})
    killed = set()
    for _ in range(3):
        status = app.wait_status(lambda s: s["state"] == "ready" and s["worker_pid"] not in killed, timeout=30)
        killed.add(status["worker_pid"])
        os.kill(status["worker_pid"], signal.SIGKILL)
    status = app.wait_status(lambda s: s["state"] == "error")
    assert "died 3 times within 120 s" in status["reason"] and "SIGKILL" in status["reason"]
    refused = mqtt_client().request(app.topic("generate"), {"prompt": "a", "max_tokens": 3})[-1]
    assert refused["error"]["code"] == "worker_crashed"
    assert http_get(app.http_url + "/healthz")[0] == 200, "the service itself stays up"
    assert app.metric("appliance_worker_restarts_total") == 2.0


def test_worker_restarts_back_off_while_it_keeps_dying(appliance_factory):
    """Only a successful model load resets the back-off, and the default model here fails its digest check: each
    death waits twice as long as the one before (0.5 s, 1 s, 2 s)."""
    app = appliance_factory("corrupt", start=False).start(wait=False)
    app.readyz_until("degraded")
    killed: list[int] = []
    waited: list[float] = []
    for _ in range(3):
        # idle with no model again (a restarted worker is "restarting", not refusing the digest, until it is up)
        status = app.wait_status(lambda s: s["worker_pid"] not in (None, *killed) and "sha256 mismatch" in s["reason"],
                                 timeout=60)
        killed.append(status["worker_pid"])
        os.kill(status["worker_pid"], signal.SIGKILL)
        at = time.monotonic()
        app.wait_status(lambda s: s["worker_pid"] not in (None, *killed), timeout=60)
        waited.append(time.monotonic() - at)
    delays = [float(d) for d in re.findall(r"worker process exited \(killed by SIGKILL\) while idle; "
                                           r"restarting it in ([\d.]+) s", app.log_text())]
    assert delays == [0.5, 1.0, 2.0], app.log_text()[-3000:]
    assert all(w >= d for w, d in zip(waited, delays, strict=True)), (waited, delays)  # the timer never fires early
    assert app.metric("appliance_worker_restarts_total") == 3.0


def test_stuck_worker_is_restarted_and_its_requester_told(appliance_factory, mqtt_client, board):
    app = _start(appliance_factory, board, extra={"worker": {"stall_timeout": 1.5}})
    client = mqtt_client()
    reply_topic = f"test/stuck/{uuid.uuid4().hex}"
    client.subscribe(reply_topic)
    client.publish(app.topic("generate"), {"prompt": "a", "max_tokens": 4000, "stream": True},
                   response_topic=reply_topic, correlation=b"s")
    client.wait_for(lambda m: m.topic == reply_topic)
    stuck = app.status()["worker_pid"]
    os.kill(stuck, signal.SIGSTOP)  # alive, but no progress
    final = client.replies(reply_topic, timeout=15)[-1]
    assert final["error"]["code"] == "timeout" and "no progress for 1.5 s" in final["error"]["message"]
    app.wait_status(lambda s: s["state"] == "ready" and s["worker_pid"] != stuck)
    assert client.request(app.topic("generate"), {"prompt": "a", "max_tokens": 3})[-1]["type"] == "result"


def test_worker_volunteers_for_the_oom_killer_under_its_own_name(appliance):
    pid = appliance.status()["worker_pid"]
    with open(f"/proc/{pid}/oom_score_adj") as fh:
        assert int(fh.read()) == 800
    with open(f"/proc/{appliance.proc.pid}/oom_score_adj") as fh:
        assert int(fh.read()) < 800
    with open(f"/proc/{pid}/comm") as fh:  # what ps, top and the kernel's OOM-killer line name it
        assert fh.read().strip() == "appliance-llm"
    # and it is the service's only child: no helper process (multiprocessing's resource tracker was one, 8 MiB)
    children = psutil.Process(appliance.proc.pid).children()
    assert [(c.pid, c.name()) for c in children] == [(pid, "appliance-llm")]


def test_status_command(appliance_factory, board):
    import subprocess
    import sys

    from tests.support.harness import REPO
    app = _start(appliance_factory, board, "tiny")
    board.set_temperature(61.5)
    app.wait_status(lambda s: s["telemetry"].get("temperature_c") == 61.5)
    out = subprocess.run([sys.executable, "-m", "appliance", "status", "--http", app.http_url], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"{app.device}: ready, model tiny" in out.stdout
    assert "temperature 61.5 °C (normal)" in out.stdout and "memory 4096 of 8192 MiB available" in out.stdout
    assert "requests outstanding 0 (0 waiting)" in out.stdout
