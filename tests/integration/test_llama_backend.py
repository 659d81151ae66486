"""The llama.cpp backend in-process, compared with llama-cpp-python's own create_completion on the same file."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.backends.base import EngineSettings, GenerationTask, Piece, PromptProgress
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.catalog import Catalog
from appliance.errors import TooLong
from appliance.protocol import Completion, Message, SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")

SETTINGS = EngineSettings(threads=2, context_size=512, batch_size=16, mmap=True)


@pytest.fixture(scope="module")
def backend(catalog_path):
    with LlamaCppBackend(SETTINGS) as b:
        b.load(Catalog.load(catalog_path).get("tiny"))
        yield b


@pytest.fixture(scope="module")
def reference(models_dir):
    llm = llama_cpp.Llama(str(models_dir / "tiny-q4_0.gguf"), n_ctx=512, n_batch=16, n_threads=2, verbose=False)
    yield llm
    llm.close()


def run(backend, prompt=None, messages=None, should_stop=lambda: False, **params):
    params.setdefault("max_tokens", 32)
    task = GenerationTask(prompt=prompt, messages=messages, params=SamplingParams(**params))
    events = list(backend.generate(task, should_stop))
    finished = [e for e in events if isinstance(e, Completion)]
    pieces = [e.text for e in events if isinstance(e, Piece)]
    return events, pieces, (finished[0] if finished else None)


PROMPTS = ["the cat is on the", "a", "Hello, world! How are you today?", "in " * 40, "ünïcödé → ✓ 日本"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_identical_to_llama_cpp_python_at_temperature_zero(backend, reference, prompt):
    expected = reference.create_completion(prompt, max_tokens=40, temperature=0)
    _, pieces, finished = run(backend, prompt, max_tokens=40, temperature=0)
    assert finished.text == expected["choices"][0]["text"]
    assert "".join(pieces) == finished.text
    assert finished.finish_reason == expected["choices"][0]["finish_reason"]
    assert finished.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert finished.usage.completion_tokens == expected["usage"]["completion_tokens"]


@pytest.mark.parametrize("seed", [1, 7, 12345])
def test_same_seed_same_text_as_llama_cpp_python(backend, reference, seed):
    expected = reference.create_completion("the cat", max_tokens=30, temperature=0.9, top_p=0.9, top_k=20, seed=seed)
    _, _, finished = run(backend, "the cat", max_tokens=30, temperature=0.9, top_p=0.9, top_k=20, seed=seed)
    assert finished.text == expected["choices"][0]["text"]


def test_stop_sequence_matches_llama_cpp_python(backend, reference):
    full = reference.create_completion("the cat is on the", max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = full[10:13]
    expected = reference.create_completion("the cat is on the", max_tokens=40, temperature=0, stop=[stop])
    events, pieces, finished = run(backend, "the cat is on the", max_tokens=40, temperature=0, stop=(stop,))
    assert finished.text == expected["choices"][0]["text"] == full[:full.index(stop)]
    assert finished.finish_reason == "stop"
    assert "".join(pieces) == finished.text, "no piece may leak part of the stop sequence"


def test_prefix_cache_does_not_change_results(backend):
    first = run(backend, "the cat is on the", max_tokens=20, temperature=0)[2].text
    run(backend, "the cat is on the mat and", max_tokens=20, temperature=0)
    assert run(backend, "the cat is on the", max_tokens=20, temperature=0)[2].text == first


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_a_repeated_prompt_is_sampled_from_kept_logits_like_llama_cpp_python(backend, reference, params):
    """The same prompt again: no prompt evaluation at all (no progress report; llama_logits.py), and the text is
    llama-cpp-python's, whose Llama samples a repeated prompt from its context's logits the same way."""
    prompt = "once upon a time there was"
    expected = reference.create_completion(prompt, max_tokens=20, **params)["choices"][0]["text"]
    run(backend, prompt, max_tokens=20, **params)
    events, _, finished = run(backend, prompt, max_tokens=20, **params)
    assert not any(isinstance(e, PromptProgress) for e in events), events
    assert finished.text == expected and finished.usage.prompt_tokens == len(reference.tokenize(prompt.encode()))


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_empty_prompt_with_no_bos_is_a_bad_request_not_a_stuck_slot(tmp_path, parallel):
    """SmolLM2's vocabulary adds no BOS, so "" has no token to start an answer from: refused, naming the prompt
    (a sequence with nothing to decode would never leave its slot)."""
    from appliance.catalog.entry import ModelEntry
    from appliance.errors import BadRequest
    from tests.support import tiny_models

    path = tiny_models.write_llama(tmp_path / "no-bos.gguf", add_bos=False)
    entry = ModelEntry(id="no-bos", path=path, sha256=None, backend="llama_cpp", template="chatml")
    with LlamaCppBackend(replace(SETTINGS, parallel=parallel)) as b:
        b.load(entry)
        with pytest.raises(BadRequest) as refused:
            run(b, "", max_tokens=4)
        assert refused.value.param == "prompt"
        assert run(b, "the cat", max_tokens=4)[2].usage.completion_tokens == 4  # the slot is free again


def test_long_prompt_reports_progress_and_can_be_cancelled_between_batches(backend):
    # Each prompt opens with a word no other test's prompt starts with: the backend reuses the longest cached
    # prefix, so after "in " * 200 (or "in " * 40) ran in the same module it would evaluate only the tail.
    prompt = "progress " + "in " * 150  # ~150 tokens = 10 batches of 16
    events, _, finished = run(backend, prompt, max_tokens=4)
    progress = [e for e in events if isinstance(e, PromptProgress)]
    assert len(progress) >= 9 and progress[-1].done == progress[-1].total
    polls = []

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    events, pieces, finished = run(backend, "cancel " + "and " * 150, max_tokens=4,
                                     should_stop=stop_after_three)
    assert finished is None and pieces == []
    assert len([e for e in events if isinstance(e, PromptProgress)]) == 3
    # the backend is usable afterwards and still exact
    assert run(backend, "the cat is on the", max_tokens=5, temperature=0)[2].usage.completion_tokens == 5


def test_prompt_longer_than_the_context_is_too_long(backend):
    with pytest.raises(TooLong) as err:
        run(backend, "word " * 600)
    assert "512" in err.value.message and err.value.param == "prompt"


def test_max_tokens_is_clamped_to_the_context(backend):
    _, _, finished = run(backend, "in " * 200, max_tokens=5000, temperature=0)
    assert finished.usage.prompt_tokens + finished.usage.completion_tokens == 512
    assert finished.finish_reason == "length"


def test_chat_uses_the_catalog_template_when_the_gguf_has_none(backend, reference):
    messages = (Message("system", "be brief"), Message("user", "hi"))
    prompt = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    expected = reference.create_completion(prompt, max_tokens=20, temperature=0, stop=["<|im_end|>"])
    _, _, finished = run(backend, messages=messages, max_tokens=20, temperature=0)
    assert finished.text == expected["choices"][0]["text"]


def test_chat_uses_the_embedded_template_like_create_chat_completion(catalog_path, models_dir):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    llm = llama_cpp.Llama(str(models_dir / "tiny-chat.gguf"), n_ctx=512, n_batch=16, n_threads=2, verbose=False)
    expected = llm.create_chat_completion(messages, max_tokens=25, temperature=0)
    llm.close()
    with LlamaCppBackend(SETTINGS) as b:
        info = b.load(Catalog.load(catalog_path).get("tiny-chat"))
        assert info.chat_template == "embedded"
        _, _, finished = run(b, messages=tuple(Message(**m) for m in messages), max_tokens=25, temperature=0)
    assert finished.text == expected["choices"][0]["message"]["content"]


@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "q4_k_m"])
def test_quantized_files_load_and_match_llama_cpp_python(tmp_path, kind):
    from tests.support import tiny_models
    f32 = tiny_models.write_llama(tmp_path / "f32.gguf", n_embd=256, n_head=8, n_head_kv=4, n_ff=512, seed=3)
    path = tiny_models.quantize(f32, tmp_path / f"{kind}.gguf", kind)
    assert path.stat().st_size < f32.stat().st_size / 2
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=16, n_threads=2, verbose=False)
    expected = llm.create_completion("the cat", max_tokens=20, temperature=0)["choices"][0]["text"]
    llm.close()
    with LlamaCppBackend(SETTINGS) as b:
        b.load(Catalog.single_file(path).get(kind))
        assert run(b, "the cat", max_tokens=20, temperature=0)[2].text == expected
