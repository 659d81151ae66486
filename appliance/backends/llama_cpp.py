"""GGUF models (Q4_0, Q4_K_M, Q8_0, ...) through llama.cpp, by way of llama-cpp-python.

Decoder-only models decode in a batch of ``worker.parallel`` sequences, one or several (llama_batch.py), on
llama.cpp's C API alone; recurrent and hybrid models (RWKV, Mamba) and encoder-decoder ones (T5) run one request at a
time through llama-cpp-python's ``Llama`` (and llama_seq2seq.py for T5's encoder). Either way generation follows
``Llama.create_completion`` exactly (same tokenisation, same sampler chain and defaults, same stop and length rules),
so the appliance's text is token-identical to calling llama-cpp-python directly (tests/integration/
test_llama_backend.py). Two things are added around it: the prompt is evaluated chunk by chunk so a cancel or timeout
is noticed during a long prompt, and text is released only when it can no longer turn into a stop sequence or the
middle of a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

from appliance.backends import llama_batch, llama_lib, templates
from appliance.backends.base import (
    Backend,
    GenerationEvent,
    GenerationTask,
    ModelInfo,
    Piece,
    PromptProgress,
    SequenceBatch,
)
from appliance.backends.jinja_template import ChatTemplate
from appliance.backends.llama_batch import PreparedRequest
from appliance.backends.llama_model import GgufModel, shared_prefix
from appliance.backends.text import Clock, TextStream, seed_of, stops_of, token_budget
from appliance.catalog.entry import ModelEntry
from appliance.errors import BadRequest, ModelError
from appliance.protocol import Completion, Message
from appliance.structured import StructuredOutput, check_complete, strict_json_strings
from appliance.tools import ToolUse, template_supports
from appliance.tools import check_complete as check_call_complete
from appliance.tools import grammar as tool_grammar

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import LlamaGrammar
    from llama_cpp.llama_types import ChatCompletionRequestMessage, ChatCompletionTool

    from appliance.backends.base import EngineSettings

_FALLBACK_TEMPLATE = "chatml"  # what llama-server uses for a GGUF without a template and no catalog entry


@dataclass
class _Loaded:
    model: GgufModel  # tokens, chat template and grammar check, the same on both paths
    llm: Llama | None  # recurrent and T5 models' generator; batched, no Llama is loaded at all (llama_lib.py)
    entry: ModelEntry
    jinja: ChatTemplate | None  # when the GGUF embeds a chat template (and the catalog names none)
    tools: bool  # that template renders tools and writes <tool_call> blocks (appliance/tools.py)
    encoder_decoder: bool  # T5: the prompt goes through the encoder (llama_seq2seq)
    batch: llama_batch.LlamaBatch | None = None  # decoder-only models: requests decode here, one or several


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self._model: _Loaded | None = None

    @property
    def _loaded(self) -> _Loaded:
        if self._model is None:
            raise ModelError("no model is loaded")
        return self._model

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def load(self, entry: ModelEntry) -> ModelInfo:
        self.close()
        info = self._load_batched(entry)  # one slot or several: the same path
        if info is not None:
            return info
        # one at a time through Llama: T5's encoder runs per request, and recurrent state in a batch is not safe in
        # this llama.cpp (a tiny RWKV-7 gave the second of two identical batched requests another text)
        self.settings = replace(self.settings, parallel=1)
        return self._load_serial(entry)

    def _load_serial(self, entry: ModelEntry) -> ModelInfo:
        from llama_cpp import Llama  # lazy: the engine is only imported inside the worker process

        try:
            llm = Llama(model_path=str(entry.path), n_ctx=self.settings.context_size, n_batch=self.settings.batch_size,
                        n_threads=self.settings.threads, n_threads_batch=self.settings.threads,
                        use_mmap=self.settings.mmap, verbose=False, flash_attn=self.settings.flash_attention,
                        lora_path=str(entry.lora) if entry.lora else None, lora_scale=entry.lora_scale)
        except (ValueError, RuntimeError, OSError) as exc:
            raise _load_error(entry, exc) from None
        try:
            self._model = self._loaded_as(GgufModel.of(llm), llm, entry)
        except BaseException:
            llm.close()
            raise
        return self._info(llm.n_ctx())

    def _load_batched(self, entry: ModelEntry) -> ModelInfo | None:
        """Weights and vocabulary without a Llama; the KV cache of every slot lives in the batch's context
        (llama_batch.make_context). None for a model that must run one request at a time."""
        try:
            model = GgufModel.load(entry.path, mmap=self.settings.mmap, lora=entry.lora, lora_scale=entry.lora_scale)
        except (ValueError, RuntimeError, OSError) as exc:
            raise _load_error(entry, exc) from None
        if model.has_encoder or model.is_recurrent:
            model.close()
            return None
        ctx = None
        try:
            self._model = loaded = self._loaded_as(model, None, entry)
            ctx = llama_batch.make_context(model, self.settings)
            loaded.batch = llama_batch.LlamaBatch(model, ctx, self.settings.parallel, self.settings.batch_size,
                                                  self._prepare, entry.id)
        except BaseException:
            if ctx is not None and self._model is not None and self._model.batch is None:
                llama_lib.bindings().llama_free(ctx)  # made, but no batch owns it yet
            self.close()
            model.close()  # idempotent: self.close() has closed it when it got as far as _model
            raise
        return self._info(self.settings.context_size)

    def _loaded_as(self, model: GgufModel, llm: Llama | None, entry: ModelEntry) -> _Loaded:
        embedded = model.chat_template()
        jinja = None
        if embedded and entry.template is None:
            jinja = ChatTemplate(embedded, eos_token=model.token_text(model.eos()),
                                 bos_token=model.token_text(model.bos()))
        return _Loaded(model, llm, entry, jinja, jinja is not None and template_supports(embedded),
                       model.has_encoder)

    def _info(self, context_size: int) -> ModelInfo:
        loaded = self._loaded
        return ModelInfo(id=loaded.entry.id, context_size=context_size, slots=self.settings.parallel,
                         chat_template="embedded" if loaded.jinja else (loaded.entry.template or _FALLBACK_TEMPLATE))

    def batch(self) -> SequenceBatch | None:
        return self._model.batch if self._model is not None else None

    def set_threads(self, threads: int) -> None:
        lib = llama_lib.bindings()
        if self._model is not None:
            batch, llm = self._model.batch, self._model.llm
            ctx = batch.ctx if batch is not None else llm.ctx if llm is not None else None
            if ctx is not None:
                lib.llama_set_n_threads(ctx, threads, threads)

    def close(self) -> None:
        if self._model is not None:
            if self._model.batch is not None:
                self._model.batch.close()  # frees its context before the model it was made from
            self._model.model.close()  # frees nothing of a Llama's: the Llama does
            if self._model.llm is not None:
                self._model.llm.close()
        self._model = None

    # -- tokens ------------------------------------------------------------------------------------------------

    def _prompt_tokens(self, task: GenerationTask) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the prompt and the template's stop sequences."""
        loaded = self._loaded
        model = loaded.model
        if task.messages is None:
            # create_completion: BOS (when the vocabulary asks for it) + the text, special tokens parsed
            return model.tokenize((task.prompt or "").encode("utf-8"), add_bos=True, special=True), ()
        if loaded.jinja is not None:
            tools = cast("list[ChatCompletionTool]", task.tools.definitions()) if task.tools is not None else None
            rendered = loaded.jinja(messages=[_as_dict(m) for m in task.messages], tools=tools)
            # the template writes BOS itself, exactly as create_chat_completion tokenises it
            tokens = model.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
            return tokens, rendered.stop
        text = templates.render(loaded.entry.template or _FALLBACK_TEMPLATE, task.messages)
        return model.tokenize(text.text.encode("utf-8"), add_bos=True, special=True), text.stop

    # -- generation --------------------------------------------------------------------------------------------

    def _prefill(self, tokens: list[int], should_stop: Callable[[], bool]) -> Iterator[PromptProgress]:
        """Evaluate the prompt batch by batch, reusing the cached prefix as ``Llama.generate`` would.

        Afterwards ``generate`` finds the whole prompt cached and samples at once; the batches are the same ones it
        would have evaluated, so results do not change.
        """
        llm = self._serial_llm()
        cached = llm.input_ids[: llm.n_tokens].tolist()
        if shared_prefix(cached, tokens) == len(tokens) == len(cached):
            return  # exact prompt already evaluated (generate decides whether it can sample right away)
        recurrent = getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False)
        kept = 0 if recurrent else self._loaded.model.keep_prefix(llm.ctx, 0, cached, tokens)
        if kept == 0:
            # recurrent state cannot be cut to a prefix; a sliding window may have dropped the prefix's own cells
            llm.reset()  # type: ignore[no-untyped-call]
        else:
            llm.n_tokens = kept  # the cells past it are gone (keep_prefix); eval() goes on from there
        step = llm.n_batch
        for start in range(llm.n_tokens, len(tokens), step):
            if should_stop():
                return
            llm.eval(tokens[start:start + step])
            yield PromptProgress(done=min(start + step, len(tokens)), total=len(tokens))

    def _prepare(self, task: GenerationTask) -> PreparedRequest:
        """Tokens, budget, stops, seed and grammar of one request, the same for the serial and batched paths."""
        loaded = self._loaded
        params = task.params
        if task.tools is not None or any(m.uses_tools for m in task.messages or ()):
            _check_tools(loaded)  # before rendering: a template without tools would drop them silently
        try:
            prompt_tokens, template_stop = self._prompt_tokens(task)
        except (ValueError, TypeError) as exc:  # a chat template that raises on these messages
            raise ModelError(f"the chat template could not render these messages: {exc}") from None
        if not prompt_tokens:  # "" with a vocabulary that adds no BOS: nothing to start the answer from
            raise BadRequest("the prompt is empty (no tokens, and this model's vocabulary adds no BOS)",
                             param="prompt")
        # batched, the Llama's own context is minimal: each sequence has worker.context_size of the batch's
        n_ctx = self.settings.context_size if loaded.batch is not None else self._serial_llm().n_ctx()
        max_tokens = token_budget(len(prompt_tokens), n_ctx, task)
        output = _tool_output(task.tools) if task.tools is not None else task.structured
        grammar = _grammar(loaded.model, output) if output is not None else None
        if grammar is not None and loaded.encoder_decoder:
            raise BadRequest("an encoder-decoder model cannot constrain its output to a grammar", param="format")
        return PreparedRequest(tokens=prompt_tokens, params=params, max_tokens=max_tokens,
                               stops=stops_of(params, template_stop), seed=seed_of(params),
                               grammar=grammar._grammar if grammar is not None else None,
                               finish=lambda completion: _check_answer(task, completion))

    def generate(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        from llama_cpp.llama_grammar import LlamaGrammar

        loaded = self._loaded
        if loaded.batch is not None:
            yield from loaded.batch.alone(task, should_stop)
            return
        llm, params = self._serial_llm(), task.params
        request = self._prepare(task)
        prompt_tokens = request.tokens
        llm.set_seed(request.seed)
        grammar = LlamaGrammar.from_string(request.grammar) if request.grammar is not None else None
        clock = Clock()
        try:
            if loaded.encoder_decoder:
                from appliance.backends import llama_seq2seq  # numpy: kept out of a batched worker (llama_lib.py)

                token_stream = llama_seq2seq.tokens(llm, prompt_tokens, params, request.seed)
            else:
                yield from self._prefill(prompt_tokens, should_stop)
                # the rest of create_completion's sampler settings stay at their defaults
                token_stream = llm.generate(prompt_tokens, temp=params.sampling_temperature,
                                            top_p=params.sampling_top_p, top_k=params.top_k,
                                            repeat_penalty=params.repeat_penalty, grammar=grammar)
            if should_stop():
                return
            for event in self._sample(loaded, token_stream, prompt_tokens, request.max_tokens, request.stops,
                                      should_stop, clock):
                if isinstance(event, Completion):
                    request.finish(event)
                yield event
        except RuntimeError as exc:  # llama_decode failures surface as RuntimeError
            raise ModelError(f"llama.cpp failed while generating: {exc}") from None

    def _serial_llm(self) -> Llama:
        llm = self._loaded.llm
        if llm is None:
            raise ModelError("this model decodes in a batch: requests join it (LlamaBatch), not generate()")
        return llm

    def _sample(self, loaded: _Loaded, token_stream: Iterator[int], prompt_tokens: list[int], max_tokens: int,
                stops: tuple[str, ...], should_stop: Callable[[], bool], clock: Clock) -> Iterator[GenerationEvent]:
        model = loaded.model
        clock.sampling()
        stream = TextStream(stops)
        n_generated, finish_reason = 0, "length"
        for token in token_stream:
            clock.token()
            if model.is_end_of_generation(token):
                finish_reason = "stop"
                break
            n_generated += 1
            stream.push(model.detokenize([token]))
            if stream.inside_character:
                continue  # like create_completion: never stop inside a multi-byte character
            if stream.find_stop():
                finish_reason = "stop"
                break
            if n_generated >= max_tokens:
                break
            if piece := stream.release():
                yield Piece(piece)
            if should_stop():
                return
        if tail := stream.finish():
            yield Piece(tail)
        yield clock.completion(stream.text, finish_reason, len(prompt_tokens), n_generated, loaded.entry.id)


def _check_answer(task: GenerationTask, completion: Completion) -> None:
    """Raise the error of a tool call or structured answer that the length limit cut short."""
    if task.tools is not None:
        check_call_complete(task.tools, completion)
    elif task.structured is not None:
        check_complete(task.structured, completion)


def _load_error(entry: ModelEntry, exc: Exception) -> ModelError:
    return ModelError(f"model '{entry.id}': llama.cpp could not load {entry.path}"
                      f"{' with LoRA ' + entry.lora.name if entry.lora else ''}: {exc}")


def _grammar(model: GgufModel, output: StructuredOutput) -> LlamaGrammar:
    """A fresh grammar for one request (a grammar sampler keeps state: never shared between requests)."""
    llama_lib.bindings()
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

    try:
        if output.kind == "json_schema":
            grammar = LlamaGrammar.from_string(strict_json_strings(json_schema_to_gbnf(output.schema or "{}")))
        else:
            grammar = LlamaGrammar.from_string(output.grammar or JSON_GBNF)
    except Exception as exc:  # the converter asserts on schemas check_schema should already have refused
        raise BadRequest(f"the JSON schema could not be turned into a grammar: {exc}", param="json_schema") from None
    if not model.grammar_parses(grammar._grammar):
        raise BadRequest("the grammar does not parse as GBNF (llama.cpp's grammar syntax)", param="grammar")
    return grammar


def _check_tools(loaded: _Loaded) -> None:
    if loaded.tools:
        return
    if loaded.jinja is None:
        why = "it has no chat template of its own"
    elif "tools" in loaded.jinja.template:
        why = "its chat template does not write calls as <tool_call> blocks, the one form the appliance parses"
    else:
        why = "its chat template does not render tools"
    raise BadRequest(f"model '{loaded.entry.id}' cannot call tools: {why}", param="tools")


def _tool_output(use: ToolUse) -> StructuredOutput | None:
    """The grammar a tool-calling answer is generated under, as a raw-grammar structured output."""
    llama_lib.bindings()
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        text = tool_grammar(use, lambda schema: strict_json_strings(json_schema_to_gbnf(schema)))
    except Exception as exc:  # the converter asserts on schemas check_schema should already have refused
        raise BadRequest(f"a tool's parameters could not be turned into a grammar: {exc}", param="tools") from None
    return StructuredOutput("grammar", grammar=text) if text is not None else None


def _as_dict(message: Message) -> ChatCompletionRequestMessage:
    out: dict[str, object] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [c.template_dict() for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return cast("ChatCompletionRequestMessage", out)
