"""What the scheduler may do under the supervisor's conditions (appliance/supervisor/guard.py) and memory
admission before each load (admission.py, with each backend's probe): first the decisions alone, then as the real
Scheduler acts on them with the fake engine."""

from __future__ import annotations

import time

import pytest

from appliance.backends.fake import script
from appliance.backends.probe import MiB
from appliance.errors import Busy, InsufficientMemory, Overheated
from appliance.messages import Done, Failed
from appliance.protocol import parse_generate
from appliance.supervisor.guard import Guard
from appliance.supervisor.policies import Conditions
from appliance.supervisor.sensors import MemoryReading
from tests.support.rig import config_with, fake_model

HOT = Conditions(thermal="hard", thermal_reason="too hot: 85.0 °C")
WARM = Conditions(thermal="soft", thermal_reason="warm: 77.0 °C")
CRITICAL = Conditions(memory="critical", memory_reason="memory critical: 80 MiB available")
LOW = Conditions(memory="low", memory_reason="memory low: 200 MiB available")


def _reading(available_mib: float) -> MemoryReading:
    return MemoryReading(available=int(available_mib * MiB), total=4096 * MiB, swap_free=0, swap_total=0,
                         psi_some_avg10=None, psi_full_avg10=None)


def _request(priority: str = "normal"):
    return parse_generate({"prompt": "x", "priority": priority})


# -- the decisions ------------------------------------------------------------------------------------------------

def test_refusals_follow_the_conditions():
    guard = Guard(config_with(), lambda: None)
    assert guard.refusal(_request(), "m") is None
    guard.update(HOT)
    assert isinstance(guard.refusal(_request(), "m"), Overheated) and guard.paused and guard.hold == HOT.thermal_reason
    guard.update(CRITICAL)
    refusal = guard.refusal(_request(), "m")
    assert isinstance(refusal, Busy) and "until memory recovers" in refusal.message and not guard.paused
    guard.update(LOW)
    assert guard.refusal(_request(), "m") is None and guard.hold is None
    assert isinstance(guard.refusal(_request("low"), "m"), Busy)


def test_a_warm_board_slows_down_and_caps_answers():
    guard = Guard(config_with(thermal={"soft_token_delay": 0.05, "soft_max_tokens": 16}), lambda: None)
    assert guard.throttle(4) == (4, 0.0) and guard.max_tokens(100) == 100
    guard.update(WARM)
    assert guard.throttle(4) == (2, 0.05) and guard.throttle(1) == (1, 0.05)
    assert guard.max_tokens(100) == 16 and guard.max_tokens(8) == 8


def test_admission_against_a_budget_names_the_keys(tmp_path):
    guard = Guard(config_with(memory={"budget_mib": 200, "margin_mib": 10}), lambda: None)
    guard.admit(fake_model(tmp_path, "small", footprint_mib=150), None)
    with pytest.raises(InsufficientMemory) as refused:
        guard.admit(fake_model(tmp_path, "big", footprint_mib=300), None)
    message = refused.value.message
    assert "'big' needs about 310 MiB (weights 0 + KV cache 300 + compute 0 + margin 10 = 310 MiB)" in message
    assert "200 MiB are available (memory.budget_mib)" in message and "lower worker.context_size" in message
    assert guard.refused_until("big") > time.monotonic()
    assert isinstance(guard.refusal(_request(), "big"), InsufficientMemory)  # refused at submit for a while
    guard.update(LOW)  # a change of memory level: try again
    assert guard.refused_until("big") == 0.0


def test_admission_counts_what_unloading_the_current_model_frees(tmp_path):
    memory = {"reading": _reading(250)}
    guard = Guard(config_with(memory={"margin_mib": 0}), lambda: memory["reading"])
    loaded = fake_model(tmp_path, "loaded", footprint_mib=100)
    wanted = fake_model(tmp_path, "wanted", footprint_mib=300)
    with pytest.raises(InsufficientMemory, match="250 MiB are available \\(MemAvailable\\)"):
        guard.admit(wanted, None)
    guard.update(LOW)
    guard.update(Conditions())
    guard.admit(wanted, loaded)  # 250 + the loaded model's 100: it fits once that one is unloaded
    memory["reading"] = None
    guard.admit(fake_model(tmp_path, "huge", footprint_mib=10**6), None)  # no reading: loaded unchecked


def test_admission_can_be_turned_off_and_a_model_without_an_estimate_loads_unchecked(tmp_path):
    Guard(config_with(memory={"admission": False, "budget_mib": 1}), lambda: None).admit(
        fake_model(tmp_path, "big", footprint_mib=300), None)
    Guard(config_with(memory={"budget_mib": 1}), lambda: None).admit(fake_model(tmp_path, "no-estimate"), None)


# -- the scheduler acting on them ---------------------------------------------------------------------------------

def test_a_model_refused_by_admission_degrades_the_status_and_fails_its_requests(rig):
    r = rig({"m": {"footprint_mib": 500}}, memory={"budget_mib": 100})
    r.wait_state("degraded")
    assert "needs about 628 MiB" in r.status.current.reason  # 500 + the default 128 MiB margin
    with pytest.raises(InsufficientMemory):
        r.submit("x")


def test_queued_requests_for_a_model_that_does_not_fit_get_memory(rig):
    r = rig({"m": {}, "big": {"footprint_mib": 500}}, memory={"budget_mib": 300})
    r.wait_state("ready")
    _, sink = r.submit("x", model="big")
    event = sink.final()
    assert isinstance(event, Failed) and event.error.code == "memory"
    assert r.status.current.model == "m" and r.status.current.state == "ready"


def test_a_hot_board_pauses_the_generation_and_refuses_new_requests(rig):
    r = rig(worker={"stall_timeout": 0.6})
    r.wait_state("ready")
    steps = [step for _ in range(50) for step in (["sleep", 0.01], ["piece", "b"])]
    job, sink = r.submit(script(["piece", "a"], *steps))
    sink.next_chunk()
    r.conditions(thermal="hard", thermal_reason="too hot")
    r.wait_state("degraded")
    with pytest.raises(Overheated, match="too hot"):
        r.submit("refused")
    seen = len(sink.chunks)
    time.sleep(0.8)  # longer than the stall timeout: a pause is not a stall
    while not sink.events.empty():
        sink.next_chunk()
    assert len(sink.chunks) - seen <= 2  # at most what was in flight when the pause arrived
    r.conditions()
    done = sink.final()
    assert isinstance(done, Done) and done.completion.usage.completion_tokens == 51
    r.wait_state("ready")


def test_a_warm_board_gets_fewer_threads_and_shorter_answers(rig):
    r = rig(thermal={"soft_max_tokens": 2, "soft_token_delay": 0.001})
    r.wait_state("ready")
    r.conditions(thermal="soft", thermal_reason="warm")
    r.wait(lambda: r.scheduler.worker.throttled == (2, 0.001), what="the throttle")
    _, sink = r.submit(script(["threads"], ["pieces", 10]))
    done = sink.final()
    assert done.completion.text == "threads=2t1 " and done.completion.finish_reason == "length"
    assert "warm" in r.status.current.warnings
    r.conditions()
    assert rig_text(r, script(["threads"])) == "threads=4"


def rig_text(r, prompt: str) -> str:
    r.wait(lambda: r.scheduler.worker.throttled == (4, 0.0), what="the throttle to lift")
    return r.submit(prompt)[1].final().completion.text


def test_critical_memory_stops_the_generation_and_unloads_the_model(rig):
    r = rig()
    _, sink = r.submit(script(["piece", "a"], ["sleep", 30]))
    sink.next_chunk()
    r.conditions(memory="critical", memory_reason="memory critical: 80 MiB available")
    event = sink.final(timeout=3)
    assert isinstance(event, Failed) and event.error.code == "memory"
    assert "memory critical: 80 MiB available; the generation was stopped" in event.error.message
    r.wait(lambda: r.scheduler.worker.loaded is None, what="the unload")
    r.wait_state("degraded")
    r.conditions()
    r.wait_state("ready")  # memory recovered: the default model is loaded again
    with pytest.raises(Busy):
        r.conditions(memory="low", memory_reason="memory low")
        r.wait(lambda: r.guard.conditions.memory == "low")
        r.submit("x", priority="low")
