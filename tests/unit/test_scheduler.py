"""The real Scheduler and worker slot against the fake engine: the queue, cancels at every stage, timeouts, stalls,
and what the appliance says meanwhile. The worker's loop runs in a thread (tests/support/thread_worker.py); the
tests of kills, crashes and restarts are in test_worker_slot.py."""

from __future__ import annotations

import pytest

from appliance.backends.fake import script
from appliance.errors import BadRequest, Busy, ModelError, UnknownModel
from appliance.generation.jobs import Requester
from appliance.messages import Abandoned, Chunk, Done, Failed

LONG = script(["piece", "a"], ["sleep", 30], ["piece", "never"])


def _code(event) -> str:
    assert isinstance(event, Failed), event
    return event.error.code


def test_a_request_streams_numbered_chunks_then_its_result(rig):
    r = rig()
    job, sink = r.submit(script(["prompt", 1, 1], ["piece", "Hel"], ["piece", "lo"]), id="q1")
    done = sink.final()
    assert isinstance(done, Done) and done.key == job.key and done.completion.text == "Hello"
    assert [(c.seq, c.text) for c in sink.chunks] == [(1, "Hel"), (2, "lo")]
    assert sink.nothing_more()
    assert r.counted("ok") == 1 and r.scheduler.outstanding == 0
    r.wait_state("ready")
    assert r.status.current.model == "m"


def test_without_a_stream_only_the_result_comes(rig):
    _, sink = rig().submit(script(["pieces", 3]), stream=False)
    assert sink.final().completion.text == "t1 t2 t3 " and sink.chunks == []


def test_the_queue_is_first_come_first_served_and_bounded(rig):
    r = rig(worker={"max_queue": 2})
    first, first_sink = r.submit(script(["piece", "1"], ["sleep", 0.3]))
    first_sink.next_chunk()  # running
    queued = [r.submit(script(["piece", str(i)])) for i in (2, 3)]
    with pytest.raises(Busy, match="queue is full"):
        r.submit("one too many")
    r.wait_state("busy")
    assert r.status.current.reason == "queue full (2 waiting)"
    assert first_sink.final().completion.text == "1"
    finished = [sink.final() for _, sink in queued]
    assert [d.completion.text for d in finished] == ["2", "3"]
    r.wait_state("ready")


def test_refusals_at_submit_name_the_problem(rig):
    r = rig({"m": {}, "sensor": {}}, models={"switch": False})
    with pytest.raises(UnknownModel, match="'nope'.*available: m"):
        r.submit("x", model="nope")
    with pytest.raises(UnknownModel):
        r.submit("x", model="sensor")  # in the catalog, but switching models is off


def test_a_tensor_model_or_a_forbidden_licence_is_refused_at_submit(rig, tmp_path):
    from dataclasses import replace

    r = rig({"m": {}, "other": {}}, start=False)
    entries = list(r.catalog)
    r.catalog._entries["other"] = replace(entries[1], backend="onnx")
    r.catalog._entries["m"] = replace(entries[0], commercial_use=False, licence="research only")
    with pytest.raises(BadRequest, match="onnx model"):
        r.submit("x", model="other")
    with pytest.raises(ModelError, match="non-commercial use only"):
        r.submit("x")


# -- cancels, at every stage --------------------------------------------------------------------------------------

def test_cancel_while_queued(rig):
    r = rig()
    _, running = r.submit(script(["piece", "a"], ["sleep", 0.3]), id="first")
    running.next_chunk()
    _, queued = r.submit("never runs", id="second")
    r.cancel("second")
    assert _code(queued.final()) == "cancelled" and queued.chunks == []
    assert isinstance(running.final(), Done)


def test_cancel_while_the_model_loads(rig):
    r = rig({"m": {"load_seconds": 2.0}})
    r.wait_state("loading")
    job, sink = r.submit("x")
    r.scheduler.cancel_job(job)
    assert _code(sink.final(timeout=1.5)) == "cancelled"
    assert r.status.current.state == "loading"  # answered at once, not after the load
    r.wait_state("ready")
    assert isinstance(r.submit("after")[1].final(), Done)


def test_cancel_during_the_prompt(rig):
    r = rig()
    job, sink = r.submit(script(["prompt", 1, 4], ["sleep", 30], ["prompt", 2, 4], ["piece", "x"]), id="p")
    r.wait(lambda: job.last_progress and r.scheduler.worker.running, what="the prompt to start")
    r.cancel("p")
    event = sink.final(timeout=2)
    assert _code(event) == "cancelled" and "'p' was cancelled" in event.error.message and sink.chunks == []
    assert isinstance(r.submit("next")[1].final(), Done)


def test_cancel_while_generating_keeps_what_was_sent(rig):
    r = rig()
    job, sink = r.submit(LONG)
    assert sink.next_chunk().text == "a"
    r.scheduler.cancel_job(job)
    assert _code(sink.final(timeout=2)) == "cancelled" and sink.text == "a"
    assert r.scheduler.worker.pid is None and r.scheduler.worker.settled  # stopped by the engine: no restart
    assert isinstance(r.submit("next")[1].final(), Done)


def test_cancel_while_the_moderation_filter_looks(rig):
    r = rig()
    held = []
    r.scheduler.gate = lambda job, release: held.append(release)  # the classifier has not answered yet
    job, sink = r.submit("x")
    r.scheduler.cancel_job(job)
    assert _code(sink.final(timeout=2)) == "cancelled", "answered at once, not when the classifier is done"
    held[0]()  # the verdict: passed, but the client went away meanwhile
    assert sink.nothing_more() and sink.chunks == []
    assert r.scheduler.outstanding == 0 and r.counted("cancelled") == 1


def test_a_cancel_by_id_while_the_moderation_filter_looks_is_honoured(rig):
    r = rig()
    held = []
    r.scheduler.gate = lambda job, release: held.append(release)
    _, sink = r.submit(LONG, id="mod")
    r.cancel("mod")
    assert _code(sink.final(timeout=2)) == "cancelled"
    held[0]()  # passed: no token is generated for it all the same, and no second reply comes
    assert sink.nothing_more(0.5) and sink.chunks == []
    assert r.scheduler.worker.running == {} and r.scheduler.outstanding == 0
    assert r.counted("cancelled") == 1


def test_a_cancel_from_another_requester_changes_nothing_at_any_stage(rig):
    r = rig()
    held = []
    gate = r.scheduler.gate
    r.scheduler.gate = lambda job, release: held.append(release) if job.request.id == "mod" else gate(job, release)
    _, running = r.submit(script(["piece", "a"], ["sleep", 0.5], ["piece", "b"]), id="run")
    running.next_chunk()
    _, queued = r.submit("q", id="queued")
    _, moderated = r.submit("m", id="mod")
    for other in (Requester(reply_to="someone/else"), Requester(account="rig/replies"), Requester(account="x")):
        for rid in ("run", "queued", "mod"):
            r.cancel(rid, other)
    held[0]()
    assert running.final().completion.text == "ab"
    assert isinstance(queued.final(), Done) and isinstance(moderated.final(), Done)
    assert r.counted("cancelled") == 0


def test_an_account_cancels_only_its_own_request(rig):
    r = rig()
    sensor1, sensor2 = Requester(account="sensor1"), Requester(account="sensor2")
    _, mine = r.submit(LONG, requester=sensor1, id="same")
    mine.next_chunk()
    _, theirs = r.submit("x", requester=sensor2, id="same")
    r.cancel("same", sensor1)
    assert _code(mine.final()) == "cancelled"
    assert isinstance(theirs.final(), Done)


def test_an_http_job_is_never_cancelled_by_id(rig):
    r = rig()
    job, sink = r.submit(script(["piece", "a"], ["sleep", 0.3]), requester=None, id="h")
    r.cancel("h")
    assert isinstance(sink.final(), Done)


def test_cancel_after_the_end_changes_nothing(rig):
    r = rig()
    job, sink = r.submit("x", id="done")
    assert isinstance(sink.final(), Done)
    r.cancel("done")
    r.scheduler.cancel_job(job)
    assert sink.nothing_more()
    assert r.counted("ok") == 1 and r.counted("cancelled") == 0
    assert isinstance(r.submit("next")[1].final(), Done)


def test_a_cancel_by_id_stops_every_job_of_that_id_from_its_requester(rig):
    r = rig()
    _, running = r.submit(LONG, id="same")
    running.next_chunk()
    _, queued = r.submit("x", id="same")
    r.cancel("same")
    assert _code(queued.final()) == "cancelled" and _code(running.final()) == "cancelled"


# -- timeouts and stalls --------------------------------------------------------------------------------------------

def test_a_request_that_waits_too_long_in_the_queue_times_out(rig):
    r = rig({"m": {"load_seconds": 1.0}}, worker={"request_timeout": 0.3})
    _, waiting = r.submit("x")  # queued while the model loads
    event = waiting.final()
    assert _code(event) == "timeout" and "still queued" in event.error.message


def test_a_generation_past_its_timeout_is_stopped(rig):
    r = rig(worker={"request_timeout": 0.3})
    _, sink = r.submit(LONG)
    event = sink.final(timeout=3)
    assert _code(event) == "timeout" and "worker.request_timeout" in event.error.message
    assert sink.text == "a"
    assert isinstance(r.submit("next")[1].final(), Done)


def test_a_stalled_worker_is_killed_and_restarted(rig):
    r = rig(worker={"stall_timeout": 0.3})
    job, sink = r.submit(script(["piece", "a"], ["stall", 30]))
    event = sink.final(timeout=5)
    assert _code(event) == "timeout" and "worker.stall_timeout" in event.error.message
    r.wait_state("ready")  # a new worker, the model loaded again
    assert isinstance(r.submit("next")[1].final(), Done)
    assert r.metrics.worker_restarts._value.get() == 1


def test_a_cancel_the_engine_does_not_notice_kills_the_worker_after_the_grace(rig):
    r = rig(worker={"cancel_grace": 0.2, "stall_timeout": 30})
    job, sink = r.submit(script(["piece", "a"], ["stall", 30]))
    sink.next_chunk()
    r.scheduler.cancel_job(job)
    assert _code(sink.final(timeout=5)) == "cancelled"
    # the requester hears at once; the kill comes after the grace, while the state may still read "ready"
    r.wait(lambda: r.metrics.worker_restarts._value.get() == 1, 10.0, "the worker restarted")
    r.wait_state("ready")
    assert r.metrics.worker_restarts._value.get() == 1


def test_a_long_prompt_is_progress_not_a_stall(rig):
    r = rig(worker={"stall_timeout": 1.0})
    steps = [step for i in range(1, 5) for step in (["prompt", i, 4], ["sleep", 0.35])]  # 1.4 s in all
    _, sink = r.submit(script(*steps, ["piece", "ok"]))
    assert sink.final(timeout=5).completion.text == "ok"


# -- the engine's own errors -------------------------------------------------------------------------------------

def test_an_engine_error_reaches_the_requester_with_its_code(rig):
    r = rig()
    _, sink = r.submit(script(["piece", "a"], ["fail", "too_long", "prompt is 900 tokens"]))
    event = sink.final()
    assert _code(event) == "too_long" and event.error.message == "prompt is 900 tokens"
    assert isinstance(r.submit("next")[1].final(), Done)


def test_close_abandons_what_is_queued_and_running(rig):
    r = rig()
    _, running = r.submit(LONG)
    running.next_chunk()
    _, queued = r.submit("x")
    r.close()
    assert isinstance(running.final(), Abandoned) and isinstance(queued.final(), Abandoned)
    with pytest.raises(Busy, match="shutting down"):
        r.submit("late")


def test_chunks_of_a_job_carry_its_key(rig):
    r = rig()
    job, sink = r.submit(script(["pieces", 3]))
    sink.final()
    assert {c.key for c in sink.chunks} == {job.key} and all(isinstance(c, Chunk) for c in sink.chunks)
