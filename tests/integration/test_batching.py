"""Continuous batching on real llama.cpp (``worker.parallel`` > 1), on the tiny generated GGUFs: first the batch
in-process (requests joining and leaving a running batch, a cancel, grammars and stops per request, text batched
against text alone at temperature 0), then the appliance as a process over MQTT (a crash with several requests in
flight, and the guard running one request at a time while memory is low)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from appliance import backends
from appliance.backends.base import EngineSettings, GenerationTask, Piece, PromptProgress, SequenceEvent
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.catalog import Catalog
from appliance.errors import ApplianceError, TooLong
from appliance.protocol import Completion, SamplingParams
from appliance.structured import StructuredOutput
from tests.support import tiny_archs
from tests.support.fresh_interpreter import last_json_line, llama_cpp_python_text
from tests.support.harness import FakeBoard

pytest.importorskip("llama_cpp")

ALONE = EngineSettings(threads=2, context_size=512, batch_size=16, mmap=True)
BATCHED = EngineSettings(threads=2, context_size=512, batch_size=16, mmap=True, parallel=4)
PROMPTS = ["the cat is on the", "a", "Hello, world! How are you today?", "in " * 40, "ünïcödé → ✓ 日本",
           "of and the", "once upon a time", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def alone(catalog_path):
    with LlamaCppBackend(ALONE) as b:
        b.load(Catalog.load(catalog_path).get("tiny"))
        yield b


@pytest.fixture(scope="module")
def batched(catalog_path):
    with LlamaCppBackend(BATCHED) as b:
        info = b.load(Catalog.load(catalog_path).get("tiny"))
        assert info.slots == 4 and info.context_size == 512
        yield b


def task(prompt: str, **params) -> GenerationTask:
    params.setdefault("max_tokens", 32)
    params.setdefault("temperature", 0)
    structured = params.pop("structured", None)
    return GenerationTask(prompt=prompt, messages=None, params=SamplingParams(**params), structured=structured)


def text_alone(backend, prompt: str, **params) -> Completion:
    events = list(backend.generate(task(prompt, **params), lambda: False))
    return next(e for e in events if isinstance(e, Completion))


class Run:
    """Steps a batch, keeping each request's events, until ``until`` holds (default: the batch is empty)."""

    def __init__(self, backend) -> None:
        self.batch = backend.batch()
        assert self.batch is not None and self.batch.keys == []
        self.events: dict[int, list] = {}

    def join(self, key: int, prompt: str, **params) -> None:
        self.batch.join(key, task(prompt, **params))
        self.events[key] = []

    def step(self) -> list[SequenceEvent]:
        events = self.batch.step()
        for event in events:
            self.events[event.key].append(event.event)
        return events

    def until(self, done=lambda run: not run.batch.keys, limit: int = 2000) -> None:
        for _ in range(limit):
            if done(self):
                return
            self.step()
        raise AssertionError("the batch never got there")

    def final(self, key: int) -> Completion | ApplianceError:
        return self.events[key][-1]

    def pieces(self, key: int) -> str:
        return "".join(e.text for e in self.events[key] if isinstance(e, Piece))


def test_batched_text_matches_the_text_alone_at_temperature_zero(alone, batched):
    """Batched matrix kernels may round differently (docs/benchmarks.md); on the tiny model they must not, and the
    figure is printed for the bench's report."""
    expected = {i: text_alone(alone, p, max_tokens=40) for i, p in enumerate(PROMPTS)}
    run, waiting = Run(batched), list(enumerate(PROMPTS))
    while waiting or run.batch.keys:  # four at a time; each newcomer joins as soon as one leaves
        while waiting and len(run.batch.keys) < 4:
            key, prompt = waiting.pop(0)
            run.join(key, prompt, max_tokens=40)
        run.step()
    differ = [PROMPTS[k] for k, c in expected.items() if run.final(k).text != c.text]
    print(f"batched vs alone at temperature 0: {len(PROMPTS) - len(differ)} of {len(PROMPTS)} identical")
    assert not differ
    for key, completion in expected.items():
        got = run.final(key)
        assert run.pieces(key) == got.text
        assert (got.finish_reason, got.usage) == (completion.finish_reason, completion.usage)


def test_flash_attention_reaches_the_batch_context_and_every_request_completes(catalog_path, monkeypatch):
    """`worker.flash_attention`: the batch's own context is made with it (seen at the llama.cpp call), and four
    requests decoded together each finish with their own text."""
    import llama_cpp

    made_with: list[int] = []
    make = llama_cpp.llama_init_from_model

    def spy(model, params):
        made_with.append(params.flash_attn_type)
        return make(model, params)

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", spy)
    settings = EngineSettings(threads=2, context_size=512, batch_size=16, parallel=4, flash_attention=True)
    with LlamaCppBackend(settings) as backend:
        backend.load(Catalog.load(catalog_path).get("tiny"))
        run = Run(backend)
        for key, prompt in enumerate(PROMPTS[:4]):
            run.join(key, prompt, max_tokens=12)
        run.until()
    assert made_with and set(made_with) == {llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED}, made_with
    for key in range(4):
        final = run.final(key)
        assert isinstance(final, Completion) and final.usage.completion_tokens > 0, final
        assert run.pieces(key) == final.text


def test_a_request_joins_a_running_batch_and_leaves_before_it(alone, batched):
    run = Run(batched)
    run.join(1, "once upon a time", max_tokens=60)
    run.until(lambda r: sum(isinstance(e, Piece) for e in r.events[1]) >= 3)
    run.join(2, "the dog sat by the", max_tokens=5)  # a prompt no other test sends: evaluated, with progress
    run.until(lambda r: 2 not in r.batch.keys)
    assert run.batch.keys == [1], "the first request still runs after the newcomer left"
    run.until()
    assert run.final(1).text == text_alone(alone, "once upon a time", max_tokens=60).text
    assert run.final(2).text == text_alone(alone, "the dog sat by the", max_tokens=5).text
    progress = [e for e in run.events[2] if isinstance(e, PromptProgress)]
    assert progress and progress[-1].done == progress[-1].total


def test_a_request_sharing_a_finished_ones_prefix_is_evaluated_from_where_they_differ(alone, batched):
    """A sequence keeps its KV cells when its request leaves; a newcomer goes to the free sequence sharing the longest
    prefix with its prompt (an unrelated one to the emptiest), and only its own part is evaluated: the first progress
    report is already past the shared prefix. The texts are those alone."""
    system = "You answer for the greenhouse in one short sentence. " * 3
    first, second, other = system + "Is it warm?", system + "Is it dry?", "of and the"
    run = Run(batched)
    for key in range(4):  # every sequence busy once, so each holds cells, then all free
        run.join(10 + key, f"{key} filler words", max_tokens=2)
    run.until()
    run.join(1, first, max_tokens=12)
    run.until()
    run.join(2, other, max_tokens=12)  # must not take the sequence holding the system prompt
    run.join(3, second, max_tokens=12)
    run.until()
    progress = [e for e in run.events[3] if isinstance(e, PromptProgress)]
    chunk = BATCHED.batch_size
    assert progress[0].done > chunk, f"evaluated from the start: {progress}"
    assert progress[-1].done == progress[-1].total
    for key, prompt in ((1, first), (2, other), (3, second)):
        assert run.final(key).text == text_alone(alone, prompt, max_tokens=12).text
    assert run.final(3).usage.prompt_tokens == progress[-1].total  # usage counts the whole prompt all the same


def test_a_repeated_prompt_joins_a_running_batch_without_being_evaluated(alone, batched):
    """Each sequence keeps the logits its prompt ended with (llama_logits.py): the same prompt again, while another
    request decodes, samples its first token from them (no prompt progress at all) and gets the text alone."""
    run = Run(batched)
    run.join(1, "once upon a time", max_tokens=6)
    run.until()
    run.join(2, "Hello, world! How are you today?", max_tokens=30)
    run.until(lambda r: any(isinstance(e, Piece) for e in r.events[2]))
    run.join(3, "once upon a time", max_tokens=6)
    run.until()
    assert not any(isinstance(e, PromptProgress) for e in run.events[3]), run.events[3]
    for key, prompt, tokens in ((1, "once upon a time", 6), (2, "Hello, world! How are you today?", 30),
                                (3, "once upon a time", 6)):
        assert run.final(key).text == text_alone(alone, prompt, max_tokens=tokens).text


@pytest.fixture
def fresh(catalog_path):
    """A batch none of whose sequences has been used yet."""
    with LlamaCppBackend(BATCHED) as backend:
        backend.load(Catalog.load(catalog_path).get("tiny"))
        yield Run(backend)


def steps_reusing_the_graph(run: Run, steps: int = 10) -> int:
    """Of ``steps`` steps taken once every request in the batch generates, how many reused the graph of the step
    before (llama.cpp's n_reused counter): all of them when each step is one graph of the same shape."""
    import llama_cpp

    keys = run.batch.keys
    run.until(lambda r: all(any(isinstance(e, Piece) for e in r.events[k]) for k in keys))
    run.step()  # the first step with all of them generating builds the graph the next ones reuse
    before = llama_cpp.llama_perf_context(run.batch.ctx).n_reused
    for _ in range(steps):
        run.step()
    assert run.batch.keys == keys, "a request ended: pick prompts that run longer"
    return llama_cpp.llama_perf_context(run.batch.ctx).n_reused - before


def test_a_step_is_one_graph_whatever_order_the_sequences_joined_in(alone, fresh):
    """llama.cpp splits a batch over per-sequence caches into runs of increasing sequence ids, a graph each. Four
    requests whose sequences come 1, 2, 3, 0 in the order they joined still decode as one graph a step, the same one
    every step, which llama.cpp then reuses. Filled in join order, each step was two graphs of different shapes, none
    reused, and the 4-client aggregate ran a quarter slower."""
    fresh.join(0, "of and the", max_tokens=1)  # sequence 0
    fresh.join(1, PROMPTS[0], max_tokens=60)  # sequence 1 (key k's prompt is PROMPTS[k - 1])
    fresh.batch.leave(0)  # sequence 0 is now the one left last: the newcomers take 2, 3 and then 0
    for key in (2, 3, 4):
        fresh.join(key, PROMPTS[key - 1], max_tokens=60)
    assert steps_reusing_the_graph(fresh) == 10
    fresh.until()
    for key in (1, 2, 3, 4):
        assert fresh.final(key).text == text_alone(alone, PROMPTS[key - 1], max_tokens=60).text


def test_a_newcomer_takes_a_sequence_that_keeps_the_busy_ids_consecutive(alone, fresh):
    """With sequences 0 and 1 busy and 3 left longer ago than 2, a newcomer that no free sequence spares any prompt
    takes 2, not 3: 0, 1 and 3 would be two runs of ids, two graphs a step (none reused by llama.cpp), 0, 1 and 2
    are one."""
    for key in range(4):  # sequences 0, 1, 2, 3 in that order
        fresh.join(key, PROMPTS[key], max_tokens=60)
    fresh.batch.leave(3)
    fresh.batch.leave(2)  # 3 is now the one left longest ago
    fresh.join(4, PROMPTS[4], max_tokens=60)
    assert steps_reusing_the_graph(fresh) == 10
    fresh.until()
    assert fresh.final(4).text == text_alone(alone, PROMPTS[4], max_tokens=60).text


def test_cancelling_one_request_leaves_the_others_untouched(alone, batched):
    run = Run(batched)
    for key, prompt in enumerate(PROMPTS[:3]):
        run.join(key, prompt, max_tokens=40)
    run.until(lambda r: all(any(isinstance(e, Piece) for e in r.events[k]) for k in range(3)))
    run.batch.leave(1)
    run.events[1].append("left")
    run.until()
    assert run.final(1) == "left"
    for key in (0, 2):
        assert run.final(key).text == text_alone(alone, PROMPTS[key], max_tokens=40).text
        assert run.pieces(key) == run.final(key).text
    run.join(9, PROMPTS[1], max_tokens=40)  # its cells stayed: the next request with its prompt starts from them
    run.until()
    assert run.final(9).text == text_alone(alone, PROMPTS[1], max_tokens=40).text


def test_grammars_stops_and_budgets_are_per_request(alone, batched):
    full = text_alone(alone, "the cat is on the", max_tokens=40).text
    stop = full[10:13]
    run = Run(batched)
    run.join(1, "the cat is on the", max_tokens=40, stop=(stop,))
    run.join(2, "the cat is on the", max_tokens=3)
    run.join(3, "a", max_tokens=60, structured=StructuredOutput("json_object"))
    run.join(4, "a", max_tokens=30, temperature=0.9, seed=7)
    run.until()
    assert run.final(1).text == full[:full.index(stop)] and run.final(1).finish_reason == "stop"
    assert run.pieces(1) == run.final(1).text, "no piece may leak part of the stop sequence"
    assert run.final(2).usage.completion_tokens == 3 and run.final(2).finish_reason == "length"
    answer = run.final(3)
    assert isinstance(answer, Completion), answer  # a cut-short answer would be an error event instead
    json.loads(answer.text)
    again = Run(batched)
    again.join(1, "a", max_tokens=30, temperature=0.9, seed=7)
    again.until()
    assert again.final(1).text == run.final(4).text, "the seed is the request's own"


def test_a_prompt_longer_than_a_slot_is_refused_at_join(batched):
    with pytest.raises(TooLong):
        batched.batch().join(1, task("in " * 600))
    assert batched.batch().keys == []


def _anonymous_mib() -> float:
    """This process's anonymous memory: what llama.cpp's KV cache and buffers take (the weights are mapped)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Anonymous line in /proc/self/smaps_rollup")


def test_a_batched_model_unloaded_gives_its_kv_cache_back(catalog_path):
    """A reload (another model, or the guard lowering the slot count) must not keep the last batch's context: its
    KV cache is every slot's context_size of cells. Three loads and closes in a row hold no more than one."""
    entry = Catalog.load(catalog_path).get("slow")  # the tiny model with the most KV cache per token
    settings = EngineSettings(threads=2, context_size=4096, batch_size=16, mmap=True, parallel=4)
    kv_mib = backends.probe_for("llama_cpp").footprint(entry, settings, margin=0).kv_cache / 2**20
    after_close = []
    for _ in range(3):
        backend = LlamaCppBackend(settings)
        assert backend.load(entry).slots == 4
        backend.close()
        backend.close()  # idempotent
        after_close.append(_anonymous_mib())
    assert kv_mib >= 32, kv_mib  # large enough that a kept context would show
    assert after_close[2] - after_close[0] < kv_mib / 2, (after_close, kv_mib)


# -- the appliance as a process ------------------------------------------------------------------------------------

def _start_streams(app, client, count: int, max_tokens: int = 4000) -> list[str]:
    topics = []
    for i in range(count):
        topic = f"test/batch/{uuid.uuid4().hex}"
        client.subscribe(topic)
        client.publish(app.topic("generate"), {"id": f"r{i}", "prompt": f"{i} a", "max_tokens": max_tokens,
                                               "stream": True}, response_topic=topic, correlation=b"c")
        topics.append(topic)
    return topics


def test_a_crash_with_several_requests_in_flight_fails_each_with_worker_crashed(appliance_factory, mqtt_client):
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "parallel": 3}})
    client = mqtt_client()
    topics = _start_streams(app, client, 3)
    for topic in topics:  # every one of them is generating
        client.wait_for(lambda m, t=topic: m.topic == t and json.loads(m.payload)["type"] == "chunk", timeout=60)
    os.kill(app.status()["worker_pid"], signal.SIGKILL)
    for topic in topics:
        (final,) = client.wait_for(lambda m, t=topic: m.topic == t and json.loads(m.payload)["type"] == "error",
                                   timeout=20)
        assert json.loads(final.payload)["error"]["code"] == "worker_crashed"
    ok = client.request(app.topic("generate"), {"prompt": "after", "max_tokens": 3}, timeout=60)
    assert ok[-1]["type"] == "result"


def test_a_short_request_is_answered_while_a_long_generation_runs(appliance_factory, mqtt_client):
    """The point of batching for a shared device: a sensor's short request no longer waits for a long answer."""
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "parallel": 2}})
    client = mqtt_client()
    (long_topic,) = _start_streams(app, client, 1)
    client.wait_for(lambda m: m.topic == long_topic and json.loads(m.payload)["type"] == "chunk", timeout=60)
    short = client.request(app.topic("generate"), {"prompt": "sensor 21.5 C", "max_tokens": 3}, timeout=60)
    assert short[-1]["type"] == "result"
    finals = [m for m in client.messages if m.topic == long_topic and json.loads(m.payload)["type"] != "chunk"]
    assert finals == [], "the long generation was still running when the short answer came"
    # the batched worker runs on llama.cpp's C API alone: numpy (15 MiB resident) never loads (llama_lib.py)
    maps = Path(f"/proc/{app.status()['worker_pid']}/maps").read_text()
    assert "libllama" in maps and "_multiarray_umath" not in maps
    client.cancel(app.topic("cancel"), "r0", long_topic)
    client.wait_for(lambda m: m.topic == long_topic and json.loads(m.payload)["type"] == "error", timeout=30)


def test_low_memory_runs_fewer_requests_at_once(appliance_factory, mqtt_client, tmp_path):
    board = FakeBoard(tmp_path / "board")
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "parallel": 3}, **board.overrides()},
                            env=board.env())
    client = mqtt_client()
    board.set_memory(200)  # below memory.low_mib: low, not critical
    app.wait_status(lambda s: any("memory low" in w for w in s.get("warnings", [])), timeout=20)
    topics = _start_streams(app, client, 2)
    client.wait_for(lambda m: m.topic in topics and json.loads(m.payload)["type"] == "chunk", timeout=60)
    time.sleep(0.5)
    assert app.metric("appliance_requests_running") == 1, "one request at a time while memory is low"
    board.set_memory(4096)  # recovered: the second one joins the running batch
    app.wait_status(lambda s: not any("memory low" in w for w in s.get("warnings", [])), timeout=20)
    for topic in topics:
        client.wait_for(lambda m, t=topic: m.topic == t and json.loads(m.payload)["type"] == "chunk", timeout=60)
    assert app.metric("appliance_requests_running") == 2
    for i, topic in enumerate(topics):  # stop them before the teardown kills the service
        client.cancel(app.topic("cancel"), f"r{i}", topic)
        client.wait_for(lambda m, t=topic: m.topic == t and json.loads(m.payload)["type"] == "error", timeout=30)


# -- other architectures -------------------------------------------------------------------------------------------

# in a child process per model, as test_architectures.py does (recurrent models loaded one after another in one
# process changed each other's output); prints the slots the backend gave the model and each batched text
BATCHED_TWICE = r"""
import json, sys
from pathlib import Path
from appliance.backends.base import EngineSettings, GenerationTask
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.catalog.entry import ModelEntry
from appliance.protocol import Completion, SamplingParams
entry = ModelEntry(id="m", path=Path(sys.argv[1]), sha256=None, backend="llama_cpp", template="plain")
with LlamaCppBackend(EngineSettings(threads=2, context_size=512, batch_size=256, parallel=2)) as backend:
    info = backend.load(entry)
    batch, texts = backend.batch(), {}
    task = GenerationTask(prompt="hello there", messages=None, params=SamplingParams(max_tokens=8, temperature=0))
    if batch is not None:
        batch.join(1, task)
        batch.join(2, task)
        while batch.keys:
            texts.update({e.key: e.event.text for e in batch.step() if isinstance(e.event, Completion)})
    print(json.dumps({"slots": info.slots, "texts": [texts.get(1), texts.get(2)]}))
"""
# the start of the two scripts below: a tiny model's batch of 2 slots, and run(batch, {key: prompt}), which joins
# them all at once and steps until they end: {key: {"text": ..., "progress": [tokens evaluated, ...]}}
TWO_SLOTS = r"""
import json, sys
from pathlib import Path
from appliance.backends.base import EngineSettings, GenerationTask, PromptProgress
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.catalog.entry import ModelEntry
from appliance.protocol import Completion, SamplingParams
entry = ModelEntry(id="m", path=Path(sys.argv[1]), sha256=None, backend="llama_cpp", template="plain")
SETTINGS = EngineSettings(threads=2, context_size=512, batch_size=16, parallel=2)
def run(batch, prompts):
    out = {key: {"text": None, "progress": []} for key in prompts}
    for key, prompt in prompts.items():
        params = SamplingParams(max_tokens=8, temperature=0)
        batch.join(key, GenerationTask(prompt=prompt, messages=None, params=params))
    while batch.keys:
        for event in batch.step():
            if isinstance(event.event, PromptProgress):
                out[event.key]["progress"].append(event.event.done)
            if isinstance(event.event, Completion):
                out[event.key]["text"] = event.event.text
    return out
"""

# the short prompt after the long one in a fresh batch, and alone in another: its text and prompt progress both
# times, and the lowest position each sequence of the first batch still holds once the long prompt ran
SLIDING_WINDOW = TWO_SLOTS + r"""
import llama_cpp
LONG, SHORT = "the cat is on the mat and " * 28, "the cat is on the mat and " * 3 + "a dog barks"
out = {}
for first in (LONG, None):
    with LlamaCppBackend(SETTINGS) as backend:
        backend.load(entry)
        batch = backend.batch()
        if first:
            run(batch, {1: first})
            memory = llama_cpp.llama_get_memory(batch.ctx)
            out["lowest"] = [llama_cpp.llama_memory_seq_pos_min(memory, s) for s in range(2)]
        out["after" if first else "alone"] = run(batch, {2: SHORT})[2]
print(json.dumps(out))
"""


def test_a_sliding_window_keeps_only_its_window_and_a_prefix_whose_cells_are_gone_is_evaluated_again(tmp_path):
    """Gemma 3's sliding-window layers keep a window of cells per sequence, as llama-server's do (Gemma-3 270M: 60 MiB
    less KV cache at 4 x 2048): after a prompt many windows long the sequence's first cells are gone, and a newcomer
    sharing only its first words (it takes that sequence: the cells would spare it most of its prompt) is evaluated
    from its start, as it is alone."""
    got = last_json_line(SLIDING_WINDOW, str(tiny_archs.write("gemma3", tmp_path / "gemma3.gguf")))
    assert max(got["lowest"]) > tiny_archs.GEMMA3_WINDOW  # with every cell kept it would be 0
    assert got["after"] == got["alone"] and got["alone"]["progress"][0] <= 16  # one chunk from the start


# the first two prompts at once (each takes a sequence), then the third: the third's first prompt progress
CHOOSING = TWO_SLOTS + r"""
with LlamaCppBackend(SETTINGS) as backend:
    backend.load(entry)
    batch = backend.batch()
    run(batch, {1: sys.argv[2], 2: sys.argv[3]})
    print(json.dumps(run(batch, {3: sys.argv[4]})[3]["progress"][0]))
"""


def test_a_newcomer_passes_over_a_prefix_its_window_left_for_one_that_still_serves(tmp_path):
    """Two free sequences share a prefix with a newcomer: one a long one whose first cells the sliding window has
    dropped (worthless, though the longer match), one a shorter one still whole. The newcomer takes the second and
    its evaluation starts past the shared part (taking the first, it would start from 0)."""
    words = "the cat is on the mat and "
    first_progress = last_json_line(CHOOSING, str(tiny_archs.write("gemma3", tmp_path / "gemma3.gguf")),
                                    words * 2 + "the dog", words * 28, words * 3 + "a dog barks")
    assert first_progress > 16, first_progress  # more than one 16-token chunk was already there


# llama.cpp's own account of the KV caches the batch context makes (one line per cache: a sliding-window model has
# two), as cells x layers x sequences
KV_CELLS = r"""
import ctypes, json, re, sys
from pathlib import Path
import llama_cpp
from appliance.backends.base import EngineSettings
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.catalog.entry import ModelEntry
entry = ModelEntry(id="m", path=Path(sys.argv[1]), sha256=None, backend="llama_cpp", template="plain")
lines = []
collect = llama_cpp.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
with LlamaCppBackend(EngineSettings(threads=2, context_size=1024, batch_size=64, parallel=2)) as backend:
    backend.load(entry)  # makes the batch's context
sizes = re.findall(r"llama_kv_cache: size = .*?\( *(\d+) cells, *(\d+) layers, *(\d+)/\d+ seqs\)", "".join(lines))
print(json.dumps(sum(int(c) * int(l) * int(s) for c, l, s in sizes)))
"""


@pytest.mark.parametrize("arch", ["gemma", "gemma3"])
def test_the_memory_estimate_counts_the_kv_cells_llama_cpp_makes(arch, tmp_path):
    """Admission's KV cache is llama.cpp's, window-sized layers included (Gemma 3's tiny file: both layers slide)."""
    from appliance.backends.llama_probe import LlamaProbe, header
    from appliance.catalog.gguf_meta import Architecture

    path = tiny_archs.write(arch, tmp_path / f"{arch}.gguf")
    cells = last_json_line(KV_CELLS, str(path))
    entry = Catalog.single_file(path).get(arch)
    shape = Architecture.from_metadata(header(path), path)
    settings = EngineSettings(threads=2, context_size=1024, batch_size=64, parallel=2)  # as KV_CELLS has them
    footprint = LlamaProbe().footprint(entry, settings, 0)
    assert cells > 0 and footprint.kv_cache == cells * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * 2


@pytest.mark.parametrize("arch", ["gptneox", "chatglm", "mpt", "gemma3", "rwkv7", "t5"])
def test_other_architectures_batch_or_run_one_at_a_time(arch, tmp_path):
    """Decoder-only attention models batch and give llama-cpp-python's text in every slot; recurrent models (RWKV,
    Mamba) and encoder-decoder ones (T5) get one slot."""
    path = tiny_archs.write(arch, tmp_path / f"{arch}.gguf")
    got = last_json_line(BATCHED_TWICE, str(path))
    if arch in ("rwkv7", "t5"):
        assert got == {"slots": 1, "texts": [None, None]}
        return
    expected = llama_cpp_python_text(path)
    assert got == {"slots": 2, "texts": [expected, expected]}
