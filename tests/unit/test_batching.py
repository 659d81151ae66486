"""Continuous batching as the scheduler and the worker's loop see it (``worker.parallel`` > 1), against the fake
engine, whose batch lets its requests' scripts take turns (appliance/backends/interleave.py): several jobs run at
once, join and leave a running batch, are cancelled or fail alone, and all get ``worker_crashed`` when the worker
dies; the guard runs fewer at once under memory pressure, and admission lowers the slot count before it refuses a
model. The same against real llama.cpp is in tests/integration/test_batching.py."""

from __future__ import annotations

import time

import pytest

from appliance.backends.fake import script
from appliance.backends.probe import MiB
from appliance.errors import InsufficientMemory
from appliance.messages import Chunk, Done, Failed, StepReport
from appliance.supervisor.guard import Guard
from tests.support.harness import wait_until
from tests.support.rig import config_with, fake_model


def _slow(name: str, seconds: float = 0.3) -> str:
    return script(["piece", f"{name}1 "], ["sleep", seconds], ["piece", f"{name}2"])


def test_up_to_parallel_jobs_run_at_once_and_the_next_waits(rig):
    r = rig(worker={"parallel": 2})
    (_, a), (_, b), (_, c) = (r.submit(_slow(n)) for n in "abc")
    assert a.next_chunk().text == "a1 " and b.next_chunk().text == "b1 "  # both started before either ended
    assert len(r.scheduler.worker.running) == 2
    assert [s.final().completion.text for s in (a, b, c)] == ["a1 a2", "b1 b2", "c1 c2"]
    assert r.scheduler.outstanding == 0


def test_a_newcomer_joins_a_running_batch_and_leaves_before_it(rig):
    r = rig(worker={"parallel": 3})
    long_job, long_sink = r.submit(_slow("long", 1.5))
    long_sink.next_chunk()
    _, short = r.submit(script(["piece", "short"]))
    assert short.final().completion.text == "short"
    assert long_job.key in r.scheduler.worker.running  # still generating when the newcomer had finished
    assert long_sink.final().completion.text == "long1 long2"


def test_cancelling_one_batched_job_leaves_the_others_complete(rig):
    r = rig(worker={"parallel": 3})
    _, a = r.submit(_slow("a"), id="a")
    _, b = r.submit(_slow("b", 5), id="b")
    _, c = r.submit(_slow("c"), id="c")
    for sink in (a, b, c):
        sink.next_chunk()
    r.cancel("b")
    cancelled = b.final()
    assert isinstance(cancelled, Failed) and cancelled.error.code == "cancelled"
    assert a.final().completion.text == "a1 a2" and c.final().completion.text == "c1 c2"
    assert a.text == "a1 a2" and c.text == "c1 c2"


def test_an_error_fails_only_its_own_job(rig):
    r = rig(worker={"parallel": 2})
    _, ok = r.submit(_slow("ok"))
    _, bad = r.submit(script(["piece", "x"], ["fail", "too_long", "prompt too long"]))
    failed = bad.final()
    assert isinstance(failed, Failed) and failed.error.code == "too_long"
    assert ok.final().completion.text == "ok1 ok2"


def test_each_job_in_flight_gets_worker_crashed_when_the_worker_dies(rig):
    r = rig(process=True, worker={"parallel": 3})
    sinks = [r.submit(_slow(n, 30))[1] for n in "ab"]
    for sink in sinks:
        sink.next_chunk(timeout=30)
    _, crasher = r.submit(script(["piece", "c"], ["exit", 3]))
    for sink in [*sinks, crasher]:
        event = sink.final(timeout=30)
        assert isinstance(event, Failed) and event.error.code == "worker_crashed", event
    assert not r.scheduler.worker.running


def test_streamed_chunks_of_batched_jobs_are_numbered_per_job(rig):
    r = rig(worker={"parallel": 2})
    _, a = r.submit(script(["pieces", 3]))
    _, b = r.submit(script(["pieces", 2]))
    a.final(), b.final()
    assert [(c.seq, c.text) for c in a.chunks] == [(1, "t1 "), (2, "t2 "), (3, "t3 ")]
    assert [c.seq for c in b.chunks] == [1, 2]
    assert all(isinstance(c, Chunk) for c in a.chunks + b.chunks)


def test_what_one_step_produced_for_several_jobs_crosses_the_pipe_as_one_message(rig, tmp_path):
    r = rig(worker={"parallel": 2})
    crossed = []
    post = r.scheduler.worker._post
    r.scheduler.worker._post = lambda tagged: (crossed.append(tagged.message), post(tagged))
    gate = tmp_path / "both-joined"
    (ja, a), (jb, b) = (r.submit(script(["wait_for", str(gate)], ["pieces", 3])) for _ in "ab")
    wait_until(lambda: len(r.scheduler.worker.running) == 2, "both jobs in the batch", timeout=10)
    gate.touch()  # both stream from the same step on (or from the next, if it opens between their turns)
    a.final(), b.final()
    steps = [m.reports for m in crossed if isinstance(m, StepReport)]
    assert steps and all(len(reports) > 1 for reports in steps)  # a lone message goes as it is
    assert any({c.key for c in reports if isinstance(c, Chunk)} == {ja.key, jb.key} for reports in steps)
    assert [(c.seq, c.text) for c in a.chunks] == [(1, "t1 "), (2, "t2 "), (3, "t3 ")]  # unpacked in order
    assert [(c.seq, c.text) for c in b.chunks] == [(1, "t1 "), (2, "t2 "), (3, "t3 ")]


def test_a_timeout_stops_only_the_job_past_it(rig):
    r = rig(worker={"parallel": 2, "request_timeout": 0.6})
    _, long_sink = r.submit(_slow("long", 30))
    long_sink.next_chunk()
    _, short = r.submit(_slow("short", 0.1))
    assert short.final().completion.text == "short1 short2"
    event = long_sink.final(timeout=5)
    assert isinstance(event, Failed) and event.error.code == "timeout" and long_sink.text == "long1 "


def test_a_stall_kills_the_worker_and_times_out_every_job_in_the_batch(rig):
    r = rig(process=True, worker={"parallel": 2, "stall_timeout": 1.0})
    _, a = r.submit(_slow("a", 30))
    a.next_chunk(timeout=30)
    _, b = r.submit(script(["piece", "b"], ["stall", 60]))  # the engine hangs: the whole batch with it
    for sink in (a, b):
        event = sink.final(timeout=30)
        assert isinstance(event, Failed) and event.error.code in ("timeout", "worker_crashed"), event
    r.wait_state("ready", timeout=30)


def test_a_hot_board_pauses_every_batched_job_then_they_finish(rig):
    r = rig(worker={"parallel": 2, "stall_timeout": 0.6})
    steps = [step for _ in range(30) for step in (["sleep", 0.01], ["piece", "x"])]
    (_, a), (_, b) = (r.submit(script(*steps)) for _ in "ab")
    a.next_chunk(), b.next_chunk()
    r.conditions(thermal="hard", thermal_reason="too hot")
    r.wait_state("degraded")
    time.sleep(0.1)
    while not a.events.empty():
        a.next_chunk()
    while not b.events.empty():
        b.next_chunk()
    seen = len(a.chunks), len(b.chunks)
    time.sleep(0.8)  # longer than the stall timeout: a pause is not a stall
    assert (len(a.chunks), len(b.chunks)) == seen and a.events.empty() and b.events.empty()
    r.conditions()
    assert a.final().completion.usage.completion_tokens == 30 == b.final().completion.usage.completion_tokens


# -- the guard: fewer slots before a refusal ----------------------------------------------------------------------

def test_low_memory_runs_one_job_at_a_time(rig):
    r = rig(worker={"parallel": 3})
    r.conditions(memory="low", memory_reason="memory low: 200 MiB available")
    r.wait(lambda: r.scheduler.guard.conditions.memory == "low")
    (_, a), (_, b) = (r.submit(_slow(n)) for n in "ab")
    a.next_chunk()
    assert b.nothing_more(0.15)  # queued behind a: one slot while memory is low
    assert len(r.scheduler.worker.running) == 1
    assert isinstance(a.final(), Done) and b.final().completion.text == "b1 b2"
    r.conditions()  # memory recovered: all the slots again
    r.wait(lambda: r.scheduler.guard.conditions.memory == "normal")
    (_, c), (_, d) = (r.submit(_slow(n)) for n in "cd")
    c.next_chunk(), d.next_chunk()
    assert len(r.scheduler.worker.running) == 2


def test_admission_lowers_the_slot_count_before_it_refuses(tmp_path):
    guard = Guard(config_with(worker={"parallel": 4}, memory={"budget_mib": 250, "margin_mib": 10}), lambda: None)
    assert guard.admit(fake_model(tmp_path, "m", footprint_mib=100), None) == 2  # 2 x 100 + 10 fits, 3 x 100 not
    assert guard.admit(fake_model(tmp_path, "tiny", footprint_mib=10), None) == 4
    with pytest.raises(InsufficientMemory, match="needs about 310 MiB"):  # even one slot does not fit
        guard.admit(fake_model(tmp_path, "big", footprint_mib=300), None)
    assert guard.footprint(fake_model(tmp_path, "m", footprint_mib=100), 2).kv_cache == 200 * MiB


def test_the_worker_runs_the_slots_admission_gave(rig):
    r = rig({"m": {"footprint_mib": 100}}, worker={"parallel": 4}, memory={"budget_mib": 250, "margin_mib": 10})
    sinks = [r.submit(_slow(n))[1] for n in "abc"]
    sinks[0].next_chunk(), sinks[1].next_chunk()
    assert sinks[2].nothing_more(0.1) and r.scheduler.worker.capacity == 2
    assert [s.final().completion.text for s in sinks] == ["a1 a2", "b1 b2", "c1 c2"]


def test_a_free_sequence_is_worth_the_prompt_it_spares_and_a_shared_bos_is_worth_nothing():
    from appliance.backends.llama_batch import LlamaBatch

    system = [1, 50, 51, 52, 53, 54, 55, 56]
    assert LlamaBatch._worth([], [1, 9, 9]) == 0  # an empty sequence
    assert LlamaBatch._worth([1, 7, 7, 7, 7, 7], [1, 9, 9, 9]) == 0  # only BOS in common
    assert LlamaBatch._worth([1, 7], [1, 7]) == 0  # the prompt's last token is evaluated anyway: nothing spared
    assert LlamaBatch._worth([*system, 60, 61], [*system, 70, 71]) == len(system)  # a shared system prompt
    assert LlamaBatch._worth([*system, 60], [*system, 60]) == len(system)  # the same prompt again: all but its last
    long_answer = [*system, *range(100, 140)]
    assert LlamaBatch._worth(long_answer, [*system, 70]) == len(system)  # most of the prompt, though few of the cells
    assert LlamaBatch._worth(long_answer, [1, 50, 51, *range(200, 220)]) == 0  # a little of both: not worth evicting
