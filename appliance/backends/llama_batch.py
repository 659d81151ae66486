"""Continuous batching for llama.cpp: up to ``worker.parallel`` requests decode in one ``llama_decode`` (with one
slot, the default, this is how a decoder-only model serves one request at a time).

Per-token work on a small board is bound by memory bandwidth, so one decode of N sequences costs little more than
one of a single sequence. Each request gets a sequence id (its own cells of the KV cache, ``context_size`` of them:
the context is made with ``n_seq_max`` = slots and a per-sequence share, llama.cpp's default when the cache is not
unified) and its own sampler chain (a grammar sampler keeps state; a seed is per request). A step puts every
generating sequence's last token in the batch, then fills what ``batch_size`` leaves with the prompt chunks of
newcomers, so a long prompt delays the others by at most one chunk per step. A request that ends or is cancelled
leaves between steps; its sequence keeps its KV cells, and the next request given that sequence starts after the
prefix it shares with them (a system prompt every sensor or Assist request repeats is evaluated once per slot): a
newcomer gets the free sequence whose cells share the longest prefix with its prompt, else one that keeps the busy
sequence ids consecutive (llama.cpp decodes each run of consecutive ids as a graph of its own), else the one left
longest ago; the same prompt again is sampled from the logits its sequence kept (llama_logits.py), with no decode
at all.

The sampler chain and the token rules are those of ``Llama.generate`` and the serial path in llama_cpp.py (same
defaults, same stop, length and UTF-8 rules), so at temperature 0 a request's text alone and batched differs only
where batched matrix kernels round differently (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.backends.base import GenerationEvent, Piece, PromptProgress, SequenceBatch, SequenceEvent
from appliance.backends.llama_logits import PromptEndLogits
from appliance.backends.llama_model import ContextSettings, shared_prefix
from appliance.backends.llama_probe import step_tokens
from appliance.backends.text import Clock, TextStream
from appliance.errors import ApplianceError, ModelError

if TYPE_CHECKING:
    from collections.abc import Callable

    from appliance.backends.base import EngineSettings, GenerationTask
    from appliance.backends.llama_model import GgufModel
    from appliance.protocol import Completion, SamplingParams

PENALTY_LAST_N = 64  # Llama's last_n_tokens_size default: the window the repeat penalty looks back over
MIN_P = 0.05  # Llama.generate's default min_p


@dataclass(frozen=True)
class PreparedRequest:
    """One request turned into what the engine runs (llama_cpp.py prepares it the same way for both paths)."""

    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    seed: int
    grammar: str | None  # GBNF text, already checked to parse
    finish: Callable[[Completion], None]  # checks the answer (tools, structured output); raises ApplianceError


@dataclass
class _Sequence:
    key: int
    seq_id: int
    request: PreparedRequest
    sampler: Any  # llama_sampler_p: the request's own chain, freed when it leaves
    stream: TextStream
    clock: Clock = field(default_factory=Clock)
    fed: int = 0  # prompt tokens already put in a batch (or kept in the KV cells from the sequence's last request)
    position: int = 0  # the position of the next token in this sequence
    cells: list[int] = field(default_factory=list)  # the tokens in this sequence's KV cells, by position
    last: int | None = None  # the token sampled last, decoded at the next step
    generated: int = 0
    logits_at: int = -1  # index in the batch just built of the token whose logits this sequence samples from
    ready: bool = False  # its prompt is the one the sequence ended last time: sampled from the kept logits (no decode)


class LlamaBatch(SequenceBatch):
    def __init__(self, model: GgufModel, ctx: Any, slots: int, prompt_chunk: int,
                 prepare: Callable[[GenerationTask], PreparedRequest], model_id: str) -> None:
        import llama_cpp

        self.slots = slots
        self._model, self.ctx = model, ctx
        self._prepare = prepare
        self._model_id = model_id
        self._chunk = prompt_chunk
        self._vocab = model.vocab
        self._memory = llama_cpp.llama_get_memory(ctx)
        # every generating sequence's token plus a chunk of prompt: the context's n_batch (llama_probe.step_tokens)
        self._batch: Any = llama_cpp.llama_batch_init(llama_cpp.llama_n_batch(ctx), 0, 1)
        self._sequences: dict[int, _Sequence] = {}
        self._left: dict[int, list[int]] = {}  # a free sequence id -> the tokens its KV cells still hold
        self._left_at: dict[int, int] = {}  # a sequence id -> when its last request left (self._leaves then)
        self._leaves = 0
        # a sequence id -> the prompt whose last logits it keeps (llama_logits.py: a repeated prompt needs no decode)
        self._prompt_ends = PromptEndLogits(llama_cpp, llama_cpp.llama_vocab_n_tokens(self._vocab), slots)
        self._ended_prompt: dict[int, list[int]] = {}

    @property
    def keys(self) -> list[int]:
        return list(self._sequences)

    def join(self, key: int, task: GenerationTask) -> None:
        import llama_cpp

        if len(self._sequences) >= self.slots:
            raise ModelError(f"the batch is full ({self.slots} requests)")
        request = self._prepare(task)
        used = {s.seq_id for s in self._sequences.values()}
        free = [i for i in range(self.slots) if i not in used]
        seq_id = max(free, key=lambda i: (self._usable_worth(i, request.tokens),
                                          -_runs(used | {i}), -self._left_at.get(i, -1)))
        tokens, cells = request.tokens, self._left.pop(seq_id, [])
        ready = (tokens != [] and self._ended_prompt.get(seq_id) == tokens == cells[:len(tokens)]
                 and self._model.keep_cells(self.ctx, seq_id, len(tokens)))
        if ready:
            kept = len(tokens)
        else:
            self._ended_prompt.pop(seq_id, None)
            kept = self._model.keep_prefix(self.ctx, seq_id, cells, tokens)
            if kept == 0:
                llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)  # whatever the last user left behind
        self._sequences[key] = _Sequence(key, seq_id, request, self._sampler(request), TextStream(request.stops),
                                         fed=kept, position=kept, cells=tokens[:kept], ready=ready)

    def _usable_worth(self, seq_id: int, tokens: list[int]) -> int:
        """``_worth`` of a free sequence's cells, nothing where a sliding window has since dropped the prefix's own
        cells (keeping it would fail: the newcomer would be evaluated from its start while a sequence whose prefix
        still serves went by)."""
        worth = self._worth(self._left.get(seq_id, []), tokens)
        return worth if worth and self._model.can_keep(self.ctx, seq_id, worth) else 0

    @staticmethod
    def _worth(cells: list[int], tokens: list[int]) -> int:
        """What a free sequence's cells are worth to a newcomer: the prompt tokens they spare evaluating, counted
        only when that is more than a BOS and at least half the prompt or half the cells (a shared BOS or first word
        must not evict another prompt's cache); the newcomer takes the worthiest sequence, else one adding no run of
        ids (``_runs``), else the one left longest ago (llama-server also weighs a slot's similarity to the prompt
        before reusing it)."""
        spared = min(shared_prefix(cells, tokens), len(tokens) - 1)
        return spared if spared > 1 and 2 * spared >= min(len(tokens), len(cells)) else 0

    def leave(self, key: int) -> None:
        self._leave(key, keep=True)

    def _leave(self, key: int, *, keep: bool) -> None:
        """Free the request's sampler; its sequence's KV cells stay for the next request's shared prefix (``keep``)
        or are cleared (a failed decode leaves them undefined)."""
        import llama_cpp

        sequence = self._sequences.pop(key, None)
        if sequence is not None:
            llama_cpp.llama_sampler_free(sequence.sampler)
            self._leaves += 1
            self._left_at[sequence.seq_id] = self._leaves
            if keep:
                self._left[sequence.seq_id] = sequence.cells
            else:
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
                self._left.pop(sequence.seq_id, None)
                self._ended_prompt.pop(sequence.seq_id, None)

    def close(self) -> None:
        import llama_cpp

        for key in list(self._sequences):
            self._leave(key, keep=False)
        self._left.clear()
        self._ended_prompt.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:  # its KV cache: every slot's context_size of cells (what a reload must get back)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def _sampler(self, request: PreparedRequest) -> Any:
        """The chain ``Llama._init_sampler`` builds for ``create_completion``'s defaults, for one request."""
        import llama_cpp

        params = request.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain owns it: freed with the chain

        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)  # this llama.cpp's penalties take the vocabulary size
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if request.grammar is not None:
            add(llama_cpp.llama_sampler_init_grammar(self._vocab, request.grammar.encode("utf-8"), b"root"))
        temperature = params.sampling_temperature
        if temperature < 0:
            add(llama_cpp.llama_sampler_init_dist(request.seed))
        elif temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(params.sampling_top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(request.seed))
        return chain

    # -- one step ----------------------------------------------------------------------------------------------

    def step(self) -> list[SequenceEvent]:
        import llama_cpp

        events: list[SequenceEvent] = []
        batch, n = self._batch, 0

        def add(token: int, sequence: _Sequence, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, sequence.position, 1
            batch.seq_id[n][0], batch.logits[n] = sequence.seq_id, logits
            sequence.cells.append(token)
            sequence.position += 1
            n += 1

        for sequence in list(self._sequences.values()):  # a repeated prompt: its first token needs no decode
            if sequence.ready:
                sequence.ready = False
                sequence.clock.sampling()
                token = self._prompt_ends.sample(sequence.seq_id, sequence.sampler)
                events.extend(SequenceEvent(sequence.key, e) for e in self._accept(sequence, token))
        ended: list[_Sequence] = []  # sequences whose prompt ends in this step: their logits are kept
        budget, takes = self._chunk, dict[int, int]()
        for sequence in self._sequences.values():  # prompt chunks go to newcomers in the order they came
            left = len(sequence.request.tokens) - sequence.fed
            if budget > 0 and left > 0:
                takes[sequence.key] = take = min(budget, left)
                budget -= take
        # llama.cpp splits a batch over per-sequence caches into runs of increasing sequence ids (split_equal's
        # "sequential"), one graph each: in join order, 4 sequences whose ids came as 1, 0, 2, 3 took two graphs a step
        # (27 ms instead of 19 on the build machine). Ids with a free one between them still take a graph per run,
        # as in llama-server.
        for sequence in sorted(self._sequences.values(), key=lambda s: s.seq_id):
            sequence.logits_at = -1
            if sequence.last is not None:
                add(sequence.last, sequence, True)
                sequence.logits_at, sequence.last = n - 1, None
            elif take := takes.get(sequence.key, 0):
                tokens = sequence.request.tokens
                for i in range(sequence.fed, sequence.fed + take):
                    add(tokens[i], sequence, i == len(tokens) - 1)
                sequence.fed += take
                if sequence.fed == len(tokens):
                    sequence.logits_at = n - 1
                    ended.append(sequence)
                events.append(SequenceEvent(sequence.key, PromptProgress(sequence.fed, len(tokens))))
        if n == 0:
            return events
        batch.n_tokens = n
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:  # 1: no KV slot (cannot happen: each sequence has its own share), 2: aborted, <0: error
            failed = [s.key for s in self._sequences.values() if s.logits_at >= 0 or s.fed > 0]
            for key in failed:
                self._leave(key, keep=False)
            error = ModelError(f"llama.cpp failed while generating: llama_decode returned {code}")
            return [*events, *(SequenceEvent(key, error) for key in failed)]
        for sequence in ended:
            self._prompt_ends.save(self.ctx, sequence.seq_id, sequence.logits_at)
            self._ended_prompt[sequence.seq_id] = sequence.request.tokens
        for sequence in list(self._sequences.values()):
            if sequence.logits_at < 0:
                continue
            if sequence.generated == 0 and sequence.clock.first_token_at is None:
                sequence.clock.sampling()
            token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, sequence.logits_at)
            events.extend(SequenceEvent(sequence.key, e) for e in self._accept(sequence, token))
        return events

    def _accept(self, sequence: _Sequence, token: int) -> list[GenerationEvent | ApplianceError]:
        """The serial path's rules for one sampled token (llama_cpp.py ``_sample``)."""

        sequence.clock.token()
        stream, request = sequence.stream, sequence.request
        if self._model.is_end_of_generation(token):
            return self._finish(sequence, "stop")
        sequence.generated += 1
        stream.push(self._model.detokenize([token]))
        sequence.last = token
        if stream.inside_character:
            return []  # never stop inside a multi-byte character
        if stream.find_stop():
            return self._finish(sequence, "stop")
        if sequence.generated >= request.max_tokens:
            return self._finish(sequence, "length")
        piece = stream.release()
        return [Piece(piece)] if piece else []

    def _finish(self, sequence: _Sequence, reason: str) -> list[GenerationEvent | ApplianceError]:
        self.leave(sequence.key)
        out: list[GenerationEvent | ApplianceError] = []
        if tail := sequence.stream.finish():
            out.append(Piece(tail))
        completion = sequence.clock.completion(sequence.stream.text, reason, len(sequence.request.tokens),
                                               sequence.generated, self._model_id)
        try:
            sequence.request.finish(completion)
        except ApplianceError as exc:
            return [*out, exc]
        return [*out, completion]


def _runs(seq_ids: set[int]) -> int:
    """Runs of consecutive ids among ``seq_ids``: the graphs one step of those sequences costs (``step``'s comment).
    Among free sequences equally worth to a newcomer, it takes one that adds no run: with sequences 0 and 2 busy a
    step was two graphs, 17-20 ms against 14-17 for sequences 0 and 1 (SmolLM2, 2 threads); 0, 1 and 3 took 23-27 ms
    against 20-23 for 0, 1 and 2."""
    return sum(1 for i in seq_ids if i - 1 not in seq_ids)


def make_context(model: GgufModel, settings: EngineSettings) -> Any:
    """A llama.cpp context with ``settings.parallel`` sequences of ``settings.context_size`` each, made with the
    settings the serial path's ``Llama`` would use (flash attention as [worker] says, rope, KV types...): the same
    arithmetic. Freed with ``llama_free``."""
    import llama_cpp

    slots = settings.parallel
    params = model.context_params(ContextSettings(n_ctx=settings.context_size * slots, n_batch=step_tokens(settings),
                                                  threads=settings.threads, flash_attention=settings.flash_attention))
    params.n_seq_max = slots
    params.kv_unified = False  # each sequence gets n_ctx / n_seq_max cells: a request cannot starve another
    # a sliding-window layer (Gemma 2 and 3: 5 of 6 layers) keeps its window and a micro-batch of cells per sequence,
    # as llama-server has it, not the whole context (llama.cpp's default): Gemma-3 270M's 4 x 2048 cells take 144
    # MiB of KV cache with every cell kept, 84 MiB so; a prefix whose window is gone is not reused (keep_cells)
    params.swa_full = False
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    if not ctx:
        raise ModelError(f"llama.cpp could not make a context for {slots} sequences of {settings.context_size} "
                         "tokens")
    try:
        model.apply_lora(ctx)
    except ModelError:
        llama_cpp.llama_free(ctx)
        raise
    return ctx
