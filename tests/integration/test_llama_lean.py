"""The batched llama.cpp path runs on llama.cpp's C API alone (appliance/backends/llama_lib.py, llama_model.py,
jinja_template.py): no ``Llama``, no numpy in the worker. What it does in place of llama-cpp-python must equal what
llama-cpp-python does, so each piece is compared with the library on real tiny GGUFs: model and context settings field
by field, tokens both ways, chat templates rendered both ways; and a fresh interpreter serving batched requests is
checked to have left numpy unloaded (the serial path, which needs ``Llama``, loads it: the check can fail)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.backends.jinja_template import ChatTemplate
from appliance.backends.llama_model import ContextSettings, GgufModel
from tests.support import tiny_models
from tests.support.fresh_interpreter import last_json_line
from tests.support.harness import REPO

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

TEXTS = ["the cat is on the", "", "a", "Hello, world!  How are you today?", "ünïcödé → ✓ 日本", "¿Dónde está? 你好",
         "<|im_start|>user\nhi<|im_end|>", "in " * 300]


def _fields(struct) -> dict[str, object]:
    """A ctypes parameter struct as plain values (pointers as their addresses, NULL as None)."""
    out: dict[str, object] = {}
    for name, *_ in struct._fields_:
        value = getattr(struct, name)
        if isinstance(value, ctypes._Pointer | ctypes._CFuncPtr):  # two objects wrapping the same address
            value = ctypes.cast(value, ctypes.c_void_p).value
        out[name] = value
    return out


@pytest.fixture(scope="module")
def pair(models_dir):
    """The same GGUF loaded by llama-cpp-python's Llama and by GgufModel.load."""
    path = models_dir / "tiny-chat.gguf"
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=16, n_threads=2, verbose=False, flash_attn=True)
    model = GgufModel.load(path, mmap=True)
    yield llm, model
    model.close()
    llm.close()


def test_model_and_context_settings_are_the_ones_llama_makes(pair, models_dir):
    llm, model = pair
    assert _fields(GgufModel.model_params(mmap=True, lora=False)) == _fields(llm.model_params)
    unmapped = llama_cpp.Llama(str(models_dir / "tiny-chat.gguf"), n_ctx=256, use_mmap=False, verbose=False)
    assert _fields(GgufModel.model_params(mmap=False, lora=False)) == _fields(unmapped.model_params)
    assert _fields(GgufModel.model_params(mmap=True, lora=True)) == _fields(unmapped.model_params)
    assert _fields(GgufModel.model_params(mmap=True, lora=False)) != _fields(unmapped.model_params)  # can differ
    unmapped.close()
    mine = model.context_params(ContextSettings(n_ctx=512, n_batch=16, threads=2, flash_attention=True))
    assert _fields(mine) == _fields(llm.context_params)
    other = model.context_params(ContextSettings(n_ctx=512, n_batch=16, threads=2, flash_attention=False))
    assert _fields(other) != _fields(llm.context_params)  # the comparison sees a difference where there is one


def test_tokens_both_ways_are_llamas(pair):
    llm, model = pair
    for text in TEXTS:
        for add_bos in (True, False):
            for special in (True, False):
                data = text.encode("utf-8")
                tokens = model.tokenize(data, add_bos=add_bos, special=special)
                assert tokens == llm.tokenize(data, add_bos=add_bos, special=special), (text, add_bos, special)
                assert model.detokenize(tokens) == llm.detokenize(tokens)
                assert model.detokenize(tokens, special=True) == llm.detokenize(tokens, special=True)
    every = list(range(llm.n_vocab()))
    assert [model.detokenize([t]) for t in every] == [llm.detokenize([t]) for t in every]
    assert (model.bos(), model.eos()) == (llm.token_bos(), llm.token_eos())
    assert model.chat_template() == llm.metadata["tokenizer.chat_template"]


def test_a_model_without_a_template_says_so(models_dir):
    model = GgufModel.load(models_dir / "tiny-q4_0.gguf", mmap=True)
    try:
        assert model.chat_template() is None
    finally:
        model.close()
        model.close()  # idempotent


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "¿Qué hora es? 现在几点？"},
     {"role": "assistant", "content": "No sé."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
         "name": "weather", "arguments": {"city": "Cusco"}}}]},
     {"role": "tool", "content": "{\"temp\": 12}", "tool_call_id": "c1"}],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather now, «in» a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("template", [tiny_models.CHAT_TEMPLATE, tiny_models.TOOLS_TEMPLATE], ids=["chat", "tools"])
def test_chat_templates_render_as_llama_cpp_pythons_formatter(template):
    mine = ChatTemplate(template, eos_token="<|im_end|>", bos_token="<s>")
    theirs = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<s>")
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            rendered, expected = mine(messages=messages, tools=tools), theirs(messages=messages, tools=tools)
            assert rendered.prompt == expected.prompt
            assert list(rendered.stop) == expected.stop
    raising = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ValueError, match="only user turns"):
        ChatTemplate(raising, eos_token="", bos_token="")(messages=CONVERSATIONS[0])


_SERVE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from appliance.backends import llama_lib
    from appliance.backends.base import EngineSettings, GenerationTask
    from appliance.backends.llama_cpp import LlamaCppBackend
    from appliance.catalog.entry import ModelEntry
    from appliance.protocol import Completion, Message, SamplingParams
    from appliance.structured import StructuredOutput

    parallel = int(sys.argv[2])
    # batch_size 64: with 16, llama.cpp (0.3.36's) corrupts the heap on the tiny RWKV-7, raw Llama() alike
    settings = EngineSettings(threads=2, context_size=256, batch_size=64, mmap=True, parallel=parallel)
    entry = ModelEntry(id="m", path=Path(sys.argv[1]), sha256=None, backend="llama_cpp", template="chatml")
    texts = []
    with LlamaCppBackend(settings) as backend:
        info = backend.load(entry)
        tasks = [GenerationTask(prompt=None, messages=(Message(role="user", content="hi"),),
                                params=SamplingParams(max_tokens=8, temperature=0)),
                 GenerationTask(prompt="the cat", messages=None, params=SamplingParams(max_tokens=8, temperature=0),
                                structured=StructuredOutput("grammar", grammar='root ::= "yes" | "no"'))]
        batch = backend.batch()
        if info.slots > 1:  # decoded together
            for key, task in enumerate(tasks):
                batch.join(key, task)
            while batch.keys:
                texts += [e.event.text for e in batch.step() if isinstance(e.event, Completion)]
        else:
            for task in tasks:
                texts += [e.text for e in backend.generate(task, lambda: False) if isinstance(e, Completion)]
    print(json.dumps({"texts": sorted(texts), "slots": info.slots, "batch": batch is not None,
                      "numpy": "numpy" in sys.modules, "stand_in": llama_lib.is_stand_in()}))
""")


def test_a_worker_never_loads_numpy_unless_the_model_must_run_through_llama(models_dir, tmp_path):
    """Decoder-only GGUFs decode in a batch, one slot or several, on the C API alone; a recurrent one (RWKV-7) runs
    through ``Llama``, which brings numpy (so the check can fail)."""
    one, two = (last_json_line(_SERVE, str(models_dir / "tiny-chat.gguf"), str(n)) for n in (1, 2))
    assert (one["slots"], two["slots"]) == (1, 2) and one["batch"] and two["batch"]
    for lean in (one, two):
        assert lean["numpy"] is False and lean["stand_in"] is True
    assert len(one["texts"]) == 2 and one["texts"] == two["texts"]  # temperature 0: alone and together alike
    from tests.support import tiny_archs
    recurrent = last_json_line(_SERVE, str(tiny_archs.write("rwkv7", tmp_path / "rwkv7.gguf")), "2")
    assert recurrent["slots"] == 1 and recurrent["batch"] is False
    assert recurrent["numpy"] is True and recurrent["stand_in"] is False


def test_the_stand_in_loads_the_real_package_when_asked_for_llama():
    code = ("import sys; from appliance.backends import llama_lib; lib = llama_lib.bindings(); "
            "assert 'numpy' not in sys.modules and lib.llama_decode is not None; "
            "from llama_cpp import Llama; import llama_cpp; "
            "print(Llama.__module__, llama_lib.is_stand_in(), 'numpy' in sys.modules, llama_cpp.Llama is Llama)")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["llama_cpp.llama", "False", "True", "True"]


def test_a_lora_adapter_applies_to_the_batched_context(tmp_path):
    """The adapter GgufModel.load reads goes on the batch's context at its scale: batched text equals llama-cpp-
    python's own with the adapter, and differs from the base model's."""
    from appliance.backends.base import EngineSettings, GenerationTask
    from appliance.backends.llama_cpp import LlamaCppBackend
    from appliance.catalog.entry import ModelEntry
    from appliance.protocol import Completion, SamplingParams

    base, lora = tiny_models.write_llama(tmp_path / "base.gguf", seed=11), tmp_path / "lora.gguf"
    tiny_models.write_lora(lora, seed=12)
    prompt, params = "the cat is on the", SamplingParams(max_tokens=24, temperature=0)

    def batched(adapter: Path | None) -> str:
        entry = ModelEntry(id="m", path=base, sha256=None, backend="llama_cpp", commercial_use=True, lora=adapter)
        with LlamaCppBackend(EngineSettings(threads=2, context_size=512, batch_size=256, parallel=2)) as backend:
            backend.load(entry)
            batch = backend.batch()
            batch.join(0, GenerationTask(prompt=prompt, messages=None, params=params))
            while batch.keys:
                done = [e.event for e in batch.step() if isinstance(e.event, Completion)]
        return done[0].text

    direct = llama_cpp.Llama(str(base), n_ctx=512, n_batch=256, n_threads=2, verbose=False, lora_path=str(lora))
    expected = direct.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
    direct.close()
    assert batched(lora) == expected
    assert batched(None) != expected


def _decode(lib, ctx, tokens: list[int], step: int = 16) -> None:
    for start in range(0, len(tokens), step):
        part = tokens[start:start + step]
        assert lib.llama_decode(ctx, lib.llama_batch_get_one((lib.llama_token * len(part))(*part), len(part))) == 0


@pytest.mark.parametrize("full_window", [True, False])
def test_a_prefix_whose_sliding_window_cells_are_gone_is_not_kept(tmp_path, full_window):
    """Gemma 3's sliding-window layers: with the cache llama.cpp makes by default (every cell kept, Llama's setting)
    a shared prefix is kept; with a window-sized cache (llama-server's default and the appliance's batch context's)
    the cells before the prefix's end were overwritten, so keep_prefix keeps nothing instead of a prefix that would
    attend to cells that are gone."""
    from appliance.backends import llama_lib
    from tests.support import tiny_archs

    lib = llama_lib.bindings()
    model = GgufModel.load(tiny_archs.write("gemma3", tmp_path / "gemma3.gguf"), mmap=True)
    params = model.context_params(ContextSettings(n_ctx=512, n_batch=16, threads=2, flash_attention=False))
    params.swa_full = full_window
    ctx = lib.llama_init_from_model(model.model, params)
    try:
        tokens = model.tokenize(b"the cat is on the mat and " * 40, add_bos=True, special=False)[:480]
        _decode(lib, ctx, tokens)
        assert model.keep_prefix(ctx, 0, tokens, [*tokens[:40], 7, 8]) == (40 if full_window else 0)
    finally:
        lib.llama_free(ctx)
        model.close()


def test_llama_cpps_errors_reach_stderr_and_its_loading_chatter_does_not(models_dir, tmp_path):
    """The worker's stderr is the service's journal: a file llama.cpp cannot load leaves its reason there, a good
    load leaves nothing (llama_lib.py's log callback; ggml's ERROR is 4, WARN 3)."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((models_dir / "tiny-chat.gguf").read_bytes()[:4000])
    code = ("import sys; from pathlib import Path; from appliance.backends.llama_model import GgufModel\n"
            "GgufModel.load(Path(sys.argv[1]), mmap=True).close()\n")
    good = subprocess.run([sys.executable, "-P", "-c", code, str(models_dir / "tiny-chat.gguf")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stderr == ""
    bad = subprocess.run([sys.executable, "-P", "-c", code, str(cut)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "error loading model" in bad.stderr
