"""RWKV ``.pth`` checkpoints (Raven RWKV-4, World v5/v6/v7) through the ``rwkv`` package (ChatRWKV's runtime).

RWKV is a recurrent network: the prompt is folded into a fixed-size state chunk by chunk (so a cancel is noticed
between chunks and memory does not grow with the context), then each sampled token advances the state by one. The
contract is the llama.cpp backend's: the same prompt templates, stop sequences, sampling settings, usage counts and
events, so MQTT and HTTP serve an RWKV model unchanged. Generation is written here rather than taken from
``PIPELINE.generate``, which has no stop strings, no cancel and stalls on invalid UTF-8.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from appliance.backends import rwkv_probe, templates
from appliance.backends.base import Backend, GenerationEvent, GenerationTask, ModelInfo, Piece, PromptProgress
from appliance.backends.rwkv_vocab import END_OF_TEXT, PileVocab, WorldVocab, open_vocabulary
from appliance.backends.text import Clock, TextStream, seed_of, stops_of, token_budget
from appliance.catalog import ModelEntry
from appliance.catalog.pth_meta import engine_strategy
from appliance.errors import ModelError

if TYPE_CHECKING:
    from appliance.backends.base import EngineSettings

_engine_classes: dict[bool, type] = {}  # is RWKV-7 -> the rwkv package's model class


def _engine_class(rwkv7: bool) -> type:
    """The package picks its RWKV-7 class by an environment variable read at import; a second copy of the module
    imported with it set serves v7 while the first keeps serving v4-v6, in one process."""
    if rwkv7 not in _engine_classes:
        os.environ.setdefault("RWKV_JIT_ON", "1")  # TorchScript, as ChatRWKV recommends for speed
        os.environ["RWKV_CUDA_ON"] = "0"  # the loader reads it; a CPU appliance has no kernels to compile
        with contextlib.redirect_stdout(io.StringIO()):  # the module announces itself on stdout
            if not rwkv7:
                from rwkv.model import RWKV
                _engine_classes[False] = RWKV
            else:
                installed = importlib.util.find_spec("rwkv.model")
                assert installed is not None and installed.origin is not None  # imported just above for v4-v6
                spec = importlib.util.spec_from_file_location("appliance_rwkv7_model", installed.origin)
                assert spec is not None and spec.loader is not None
                os.environ["RWKV_V7_ON"] = "1"
                try:
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                finally:
                    del os.environ["RWKV_V7_ON"]
                _engine_classes[True] = module.RWKV_x070
    return _engine_classes[rwkv7]


class RwkvBackend(Backend):
    name = "rwkv"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self._model = None
        self._vocab: WorldVocab | PileVocab | None = None
        self._entry: ModelEntry | None = None
        self._template = "rwkv-world"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def load(self, entry: ModelEntry) -> ModelInfo:
        import torch  # lazy: torch is the rwkv package's engine

        self.close()
        checkpoint, vocabulary = rwkv_probe.inspect(entry)
        vocab = open_vocabulary(vocabulary)
        if vocab.size > checkpoint.n_vocab:
            raise ModelError(f"model '{entry.id}': the tokenizer has {vocab.size} tokens but the model's embedding "
                             f"only {checkpoint.n_vocab} rows; they do not belong together")
        strategy = engine_strategy(entry.strategy or self.settings.rwkv_strategy, checkpoint.version)
        torch.set_num_threads(self.settings.threads)
        engine = _engine_class(checkpoint.version == 7)
        # v7 appends ".pth" to whatever it is given, v4-v6 only when missing: the stem works for both
        stem = str(entry.path.with_suffix(""))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._model = engine(stem, strategy) if checkpoint.version == 7 else engine(stem, strategy,
                                                                                            verbose=False)
        except (RuntimeError, KeyError, AssertionError, ValueError, OSError, IndexError) as exc:
            raise ModelError(f"model '{entry.id}': rwkv could not load {entry.path} with strategy "
                             f"'{strategy}': {type(exc).__name__}: {exc}") from None
        self._vocab, self._entry = vocab, entry
        self._template = entry.template or ("raven" if isinstance(vocab, PileVocab) else "rwkv-world")
        return ModelInfo(id=entry.id, context_size=self.settings.context_size, chat_template=self._template)

    def set_threads(self, threads: int) -> None:
        import torch
        torch.set_num_threads(threads)

    def close(self) -> None:
        if self._model is not None:
            self._model = None
            gc.collect()  # the weights are one large graph of tensors: give the memory back now
        self._vocab, self._entry = None, None

    # -- generation --------------------------------------------------------------------------------------------

    def generate(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        import numpy as np
        import torch

        from appliance.backends.sampling import penalise_repeats, sample_like_chatrwkv

        if self._model is None:
            raise ModelError("no model is loaded")
        params = task.params
        if task.messages is None:
            text, template_stop = task.prompt, ()
        else:
            rendered = templates.render(self._template, task.messages)
            text, template_stop = rendered.text, rendered.stop
        # an empty prompt starts a new document, which is what token 0 means to an RWKV model
        prompt_tokens = self._vocab.encode(text) or [END_OF_TEXT]
        max_tokens = token_budget(len(prompt_tokens), self.settings.context_size, task)
        rng = np.random.RandomState(seed_of(params) % 2**32)
        stream = TextStream(stops_of(params, template_stop))
        clock = Clock()

        state, logits, step = None, None, self.settings.batch_size
        with torch.no_grad():
            for start in range(0, len(prompt_tokens), step):
                if should_stop():
                    return
                logits, state = self._model.forward(prompt_tokens[start:start + step], state)
                yield PromptProgress(done=min(start + step, len(prompt_tokens)), total=len(prompt_tokens))
            clock.sampling()
            recent, n_generated, finish_reason = list(prompt_tokens), 0, "length"
            while True:
                scores = logits.float().numpy().copy()
                penalise_repeats(scores, recent, params.repeat_penalty)
                token = sample_like_chatrwkv(scores, temperature=params.sampling_temperature,
                                             top_p=params.sampling_top_p, top_k=params.top_k, rng=rng)
                clock.token()
                if token == END_OF_TEXT:
                    finish_reason = "stop"
                    break
                n_generated += 1
                recent.append(token)
                stream.push(self._vocab.token_bytes(token))
                if not stream.inside_character and stream.find_stop():
                    finish_reason = "stop"
                    break
                if n_generated >= max_tokens:
                    break
                if not stream.inside_character and (piece := stream.release()):
                    yield Piece(piece)
                if should_stop():
                    return
                logits, state = self._model.forward([token], state)
        if tail := stream.finish():
            yield Piece(tail)
        yield clock.completion(stream.text, finish_reason, len(prompt_tokens), n_generated, self._entry.id)
