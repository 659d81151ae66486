"""The worker's life cycle (appliance/generation/slot.py) under the real Scheduler: crashes, kills, restarts with
back-off, giving up, and models that will not load. The first tests run the fake engine in a real child process
(spawned, killed with SIGKILL, exiting with a code); the rest in a thread, where an exit is the same message."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from appliance.backends.fake import script
from appliance.errors import ModelError, UnsupportedArchitecture, WorkerCrashed
from appliance.generation import slot
from appliance.messages import Done, Failed


def _error(event) -> Failed:
    assert isinstance(event, Failed), event
    return event


def test_a_worker_process_that_dies_fails_its_job_and_is_restarted(rig):
    r = rig(process=True)
    r.wait_state("ready", timeout=30)
    first_pid = r.scheduler.worker.pid
    _, sink = r.submit(script(["piece", "a"], ["exit", 3]))
    event = _error(sink.final(timeout=30))
    assert event.error.code == "worker_crashed" and "(exit code 3)" in event.error.message
    r.wait_state("ready", timeout=30)
    assert r.scheduler.worker.pid not in (None, first_pid)
    assert isinstance(r.submit("again")[1].final(timeout=30), Done)


def test_a_stalled_worker_process_is_killed_with_sigkill(rig, caplog):
    r = rig(process=True, worker={"stall_timeout": 0.5})
    _, sink = r.submit(script(["piece", "a"], ["stall", 60]))
    with caplog.at_level(logging.ERROR, logger="appliance.generation.slot"):
        assert _error(sink.final(timeout=30)).error.code == "timeout"
        r.wait_state("ready", timeout=30)
    assert "worker process exited (killed by SIGKILL) while generating" in caplog.text


def _worker_environ(rig) -> list[bytes]:
    """The environment a real worker process started with, entry by entry."""
    r = rig(process=True)
    r.wait_state("ready", timeout=30)
    return Path(f"/proc/{r.scheduler.worker.pid}/environ").read_bytes().split(b"\0")


def test_a_worker_process_starts_with_malloc_thresholds_fixed_and_short_openmp_spins(rig):
    """A freed llama.cpp context must not raise malloc's thresholds for the rest of the worker's life, and OpenMP
    threads must not spin away a shared core's time (appliance/process/handle.py: CHILD_ENV)."""
    environ = _worker_environ(rig)
    assert b"MALLOC_TRIM_THRESHOLD_=131072" in environ
    assert b"GOMP_SPINCOUNT=300" in environ


def test_the_operators_own_openmp_setting_wins(rig, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    environ = _worker_environ(rig)
    assert b"GOMP_SPINCOUNT=300000" in environ and b"GOMP_SPINCOUNT=300" not in environ


def test_restarts_back_off_then_stop_and_refuse(rig, monkeypatch, caplog):
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.1)
    with caplog.at_level(logging.ERROR, logger="appliance.generation.slot"):
        r = rig({"m": {"load_exit": 1}}, worker={"max_restarts": 2, "restart_window": 60})
        r.wait_state("error")
    delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+) s", caplog.text)]
    assert delays == [0.1, 0.2]  # doubled after each crash; the third crash gives up
    assert "died 3 times within 60 s (worker.max_restarts = 2; last: exit code 1)" in r.status.current.reason
    with pytest.raises(WorkerCrashed, match="not restarting it"):
        r.submit("refused at once")


def test_a_loaded_model_resets_the_back_off(rig, monkeypatch, caplog):
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.1)
    r = rig()
    with caplog.at_level(logging.ERROR, logger="appliance.generation.slot"):
        for _ in range(2):
            r.wait_state("ready")
            _, sink = r.submit(script(["exit", 1]))
            sink.final()
    assert re.findall(r"restarting it in ([\d.]+) s", caplog.text) == ["0.1", "0.1"]  # not 0.2 the second time


def test_queued_jobs_fail_once_the_worker_gives_up(rig, monkeypatch):
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.02)
    r = rig(worker={"max_restarts": 1})
    _, first = r.submit(script(["piece", "a"], ["exit", 1]))
    first.final()
    r.wait(lambda: r.scheduler.worker.free, what="the restart")
    _, second = r.submit(script(["piece", "a"], ["sleep", 0.2], ["exit", 1]))
    second.next_chunk()
    _, queued = r.submit("waiting behind it")
    assert _error(second.final()).error.code == "worker_crashed"
    assert _error(queued.final()).error.code == "worker_crashed"


def test_a_model_that_fails_to_load_is_refused_until_restart(rig):
    r = rig({"m": {"load_error": ["model_error", "tensor 'x' is missing"]}})
    r.wait_state("degraded")
    assert "tensor 'x' is missing" in r.status.current.reason
    with pytest.raises(ModelError, match="tensor 'x' is missing") as refused:
        r.submit("x")
    assert refused.value.param == "model"


def test_a_load_that_kills_the_worker_three_times_is_given_up(rig, monkeypatch):
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.02)
    r = rig({"m": {"load_exit": 7}})
    _, sink = r.submit("x")
    event = _error(sink.final())
    assert event.error.code == "model_error"
    assert "the worker died 3 times while loading it (last: exit code 7)" in event.error.message
    r.wait_state("degraded")


def test_an_architecture_the_engine_cannot_run_is_refused_before_loading(rig):
    r = rig({"m": {}, "opt": {"architecture": "opt"}})
    r.wait_state("ready")
    _, sink = r.submit("x", model="opt")
    event = _error(sink.final())
    assert event.error.code == "unsupported_architecture" and "'opt'" in event.error.message
    with pytest.raises(UnsupportedArchitecture):
        r.submit("x", model="opt")
    assert r.status.current.model == "m"  # the loaded model never stopped serving


def test_switching_models_starts_a_fresh_process_and_a_refused_load_keeps_the_old_model(rig):
    r = rig({"m": {}, "n": {}, "broken": {"load_error": ["model_error", "bad"]}})
    r.wait_state("ready")
    assert r.submit("x", model="n")[1].final().completion.model == "n"
    assert r.status.current.model == "n"
    assert _error(r.submit("x", model="broken")[1].final()).error.code == "model_error"
    assert r.submit("x", model="m")[1].final().completion.model == "m"


def test_a_load_past_its_timeout_kills_the_worker(rig, monkeypatch):
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.02)
    r = rig({"m": {"load_seconds": 30}}, worker={"load_timeout": 0.2})
    r.wait(lambda: r.metrics.worker_restarts._value.get() >= 1, what="the load timeout to kill the worker")


def test_error_recovers_after_the_restart_window(rig, monkeypatch):
    """`error` is not for good: after worker.restart_window the worker is tried again from a clean slate."""
    monkeypatch.setattr(slot, "BACKOFF_FIRST", 0.02)
    r = rig(worker={"max_restarts": 1, "restart_window": 1})
    for _ in range(2):
        r.wait(lambda: r.scheduler.worker.free, what="a worker")
        _, sink = r.submit(script(["exit", 1]))
        sink.final()
    r.wait_state("error")
    r.wait_state("ready", timeout=30)
    _, sink = r.submit("after the back-off")
    assert isinstance(sink.final(), Done)
