"""GGUF models (Q4_0, Q4_K_M, Q8_0, ...) through llama.cpp, by way of llama-cpp-python.

Generation follows ``Llama.create_completion`` exactly (same tokenisation, same sampler chain and defaults, same
stop and length rules), so the appliance's text is token-identical to calling llama-cpp-python directly. Two things
are added around it: the prompt is evaluated batch by batch so a cancel or timeout is noticed during a long prompt,
and text is released only when it can no longer turn into a stop sequence or the middle of a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

from appliance.backends import llama_batch, llama_seq2seq, templates
from appliance.backends.base import (
    Backend,
    GenerationEvent,
    GenerationTask,
    ModelInfo,
    Piece,
    PromptProgress,
    SequenceBatch,
)
from appliance.backends.llama_batch import PreparedRequest
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
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import LlamaGrammar
    from llama_cpp.llama_types import ChatCompletionRequestMessage, ChatCompletionTool

    from appliance.backends.base import EngineSettings

_OWN_CONTEXT, _OWN_BATCH = 256, 8  # batched: the Llama object's own context, made by Llama() and freed (load)
_FALLBACK_TEMPLATE = "chatml"  # what llama-server uses for a GGUF without a template and no catalog entry


@dataclass
class _Loaded:
    llm: Llama
    entry: ModelEntry
    jinja: Jinja2ChatFormatter | None  # when the GGUF embeds a chat template (and the catalog names none)
    tools: bool  # that template renders tools and writes <tool_call> blocks (appliance/tools.py)
    encoder_decoder: bool  # T5: the prompt goes through the encoder (llama_seq2seq)
    batch: llama_batch.LlamaBatch | None = None  # worker.parallel > 1: requests decode together here


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
        import llama_cpp  # lazy: the engine is only imported inside the worker process
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.close()
        threads, slots = self.settings.threads, self.settings.parallel
        # batched: the Llama object keeps the weights, tokenizer and template; the KV cache of every slot lives in
        # the batch's own context (llama_batch.make_context). Llama() insists on a context of its own: the smallest
        # (llama.cpp rounds n_ctx up to 256), freed below before the batch's is made
        n_ctx, n_batch = (_OWN_CONTEXT, _OWN_BATCH) if slots > 1 else (self.settings.context_size,
                                                                       self.settings.batch_size)
        try:
            llm = llama_cpp.Llama(
                model_path=str(entry.path), n_ctx=n_ctx, n_batch=n_batch,
                n_threads=threads, n_threads_batch=threads, use_mmap=self.settings.mmap, verbose=False,
                flash_attn=self.settings.flash_attention,
                lora_path=str(entry.lora) if entry.lora else None, lora_scale=entry.lora_scale)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"model '{entry.id}': llama.cpp could not load {entry.path}"
                             f"{' with LoRA ' + entry.lora.name if entry.lora else ''}: {exc}") from None
        embedded = llm.metadata.get("tokenizer.chat_template")
        jinja = None
        if embedded and entry.template is None:
            jinja = Jinja2ChatFormatter(template=embedded, eos_token=_token_text(llm, llm.token_eos()),
                                        bos_token=_token_text(llm, llm.token_bos()))
        self._model = _Loaded(llm, entry, jinja, jinja is not None and template_supports(embedded),
                              bool(llama_cpp.llama_model_has_encoder(llm.model)))
        # one at a time: T5's encoder runs per request, and recurrent state in a batch is not safe in this
        # llama.cpp (a tiny RWKV-7 gave the second of two identical batched requests another text)
        if slots > 1 and (self._model.encoder_decoder or llama_cpp.llama_model_is_recurrent(llm.model)
                          or llama_cpp.llama_model_is_hybrid(llm.model)):
            self.settings = replace(self.settings, parallel=1)
            return self.load(entry)
        context_size = llm.n_ctx()
        if slots > 1:
            # nothing decodes in the Llama's own context while a batch serves: its KV cells and buffers (~6 MiB
            # for SmolLM2-135M) go back now (Llama.close frees it only once, so closing it early is safe)
            llm._ctx.close()  # type: ignore[no-untyped-call]
            try:
                ctx = llama_batch.make_context(llm, slots, self.settings.context_size, self.settings.batch_size,
                                               threads)
            except ModelError:
                self.close()
                raise
            self._model.batch = llama_batch.LlamaBatch(llm, ctx, slots, self.settings.batch_size, self._prepare,
                                                       entry.id)
            context_size = self.settings.context_size
        return ModelInfo(id=entry.id, context_size=context_size, slots=slots,
                         chat_template="embedded" if jinja else (entry.template or _FALLBACK_TEMPLATE))

    def batch(self) -> SequenceBatch | None:
        return self._model.batch if self._model is not None else None

    def set_threads(self, threads: int) -> None:
        import llama_cpp
        if self._model is not None:
            batch = self._model.batch  # batched, the Llama's own context is freed (load)
            llama_cpp.llama_set_n_threads(batch.ctx if batch is not None else self._model.llm.ctx, threads, threads)

    def close(self) -> None:
        if self._model is not None:
            if self._model.batch is not None:
                self._model.batch.close()  # frees its context before the model it was made from
            self._model.llm.close()
        self._model = None

    # -- tokens ------------------------------------------------------------------------------------------------

    def _prompt_tokens(self, task: GenerationTask) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the prompt and the template's stop sequences."""
        loaded = self._loaded
        llm = loaded.llm
        if task.messages is None:
            # create_completion: BOS (when the vocabulary asks for it) + the text, special tokens parsed
            return llm.tokenize((task.prompt or "").encode("utf-8"), add_bos=True, special=True), ()
        if loaded.jinja is not None:
            tools = cast("list[ChatCompletionTool]", task.tools.definitions()) if task.tools is not None else None
            rendered = loaded.jinja(messages=[_as_dict(m) for m in task.messages], tools=tools)
            # the template writes BOS itself, exactly as create_chat_completion tokenises it
            tokens = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
            stop = rendered.stop or ()
            return tokens, (stop,) if isinstance(stop, str) else tuple(stop)
        text = templates.render(loaded.entry.template or _FALLBACK_TEMPLATE, task.messages)
        return llm.tokenize(text.text.encode("utf-8"), add_bos=True, special=True), text.stop

    def _is_end_of_generation(self, token: int) -> bool:
        import llama_cpp
        # pinned llama-cpp-python 0.3.x: the vocab handle lives on the private model wrapper
        return bool(llama_cpp.llama_vocab_is_eog(self._loaded.llm._model.vocab, token))

    # -- generation --------------------------------------------------------------------------------------------

    def _prefill(self, tokens: list[int], should_stop: Callable[[], bool]) -> Iterator[PromptProgress]:
        """Evaluate the prompt batch by batch, reusing the cached prefix as ``Llama.generate`` would.

        Afterwards ``generate`` finds the whole prompt cached and samples at once; the batches are the same ones it
        would have evaluated, so results do not change.
        """
        llm = self._loaded.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        if common == len(tokens) == len(cached):
            return  # exact prompt already evaluated (generate decides whether it can sample right away)
        if common == len(tokens):
            common -= 1  # re-evaluate the last prompt token to refresh its logits
        if common == 0 or getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
            llm.reset()  # type: ignore[no-untyped-call]  # recurrent state cannot be truncated to a prefix
        else:
            llm.n_tokens = common  # eval() drops the cache cells past n_tokens
        step = llm.n_batch
        for start in range(llm.n_tokens, len(tokens), step):
            if should_stop():
                return
            llm.eval(tokens[start:start + step])
            yield PromptProgress(done=min(start + step, len(tokens)), total=len(tokens))

    def _prepare(self, task: GenerationTask) -> PreparedRequest:
        """Tokens, budget, stops, seed and grammar of one request, the same for the serial and batched paths."""
        loaded = self._loaded
        llm, params = loaded.llm, task.params
        if task.tools is not None or any(m.uses_tools for m in task.messages or ()):
            _check_tools(loaded)  # before rendering: a template without tools would drop them silently
        try:
            prompt_tokens, template_stop = self._prompt_tokens(task)
        except (ValueError, TypeError) as exc:  # a chat template that raises on these messages
            raise ModelError(f"the chat template could not render these messages: {exc}") from None
        # batched, the Llama's own context is minimal: each sequence has worker.context_size of the batch's
        n_ctx = self.settings.context_size if loaded.batch is not None else llm.n_ctx()
        max_tokens = token_budget(len(prompt_tokens), n_ctx, task)
        output = _tool_output(llm, task.tools) if task.tools is not None else task.structured
        grammar = _grammar(llm, output) if output is not None else None
        if grammar is not None and loaded.encoder_decoder:
            raise BadRequest("an encoder-decoder model cannot constrain its output to a grammar", param="format")
        return PreparedRequest(tokens=prompt_tokens, params=params, max_tokens=max_tokens,
                               stops=stops_of(params, template_stop), seed=seed_of(params),
                               grammar=grammar._grammar if grammar is not None else None,
                               finish=lambda completion: _check_answer(task, completion))

    def generate(self, task: GenerationTask, should_stop: Callable[[], bool]) -> Iterator[GenerationEvent]:
        from llama_cpp.llama_grammar import LlamaGrammar

        loaded = self._loaded
        llm, params = loaded.llm, task.params
        request = self._prepare(task)
        prompt_tokens = request.tokens
        llm.set_seed(request.seed)
        grammar = LlamaGrammar.from_string(request.grammar) if request.grammar is not None else None
        clock = Clock()
        try:
            if loaded.encoder_decoder:
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

    def _sample(self, loaded: _Loaded, token_stream: Iterator[int], prompt_tokens: list[int], max_tokens: int,
                stops: tuple[str, ...], should_stop: Callable[[], bool], clock: Clock) -> Iterator[GenerationEvent]:
        llm = loaded.llm
        clock.sampling()
        stream = TextStream(stops)
        n_generated, finish_reason = 0, "length"
        for token in token_stream:
            clock.token()
            if self._is_end_of_generation(token):
                finish_reason = "stop"
                break
            n_generated += 1
            stream.push(llm.detokenize([token]))
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


def _grammar(llm: Llama, output: StructuredOutput) -> LlamaGrammar:
    """A fresh grammar for one request (a grammar sampler keeps state: never shared between requests)."""
    import llama_cpp
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

    try:
        if output.kind == "json_schema":
            grammar = LlamaGrammar.from_string(strict_json_strings(json_schema_to_gbnf(output.schema or "{}")))
        else:
            grammar = LlamaGrammar.from_string(output.grammar or JSON_GBNF)
    except Exception as exc:  # the converter asserts on schemas check_schema should already have refused
        raise BadRequest(f"the JSON schema could not be turned into a grammar: {exc}", param="json_schema") from None
    # llama-cpp-python adds a grammar that fails to parse as a NULL sampler (a crash later): try it here first
    probe = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode("utf-8"), b"root")
    if not probe:
        raise BadRequest("the grammar does not parse as GBNF (llama.cpp's grammar syntax)", param="grammar")
    llama_cpp.llama_sampler_free(probe)
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


def _tool_output(llm: Llama, use: ToolUse) -> StructuredOutput | None:
    """The grammar a tool-calling answer is generated under, as a raw-grammar structured output."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        text = tool_grammar(use, lambda schema: strict_json_strings(json_schema_to_gbnf(schema)))
    except Exception as exc:  # the converter asserts on schemas check_schema should already have refused
        raise BadRequest(f"a tool's parameters could not be turned into a grammar: {exc}", param="tools") from None
    return StructuredOutput("grammar", grammar=text) if text is not None else None


def _token_text(llm: Llama, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""


def _as_dict(message: Message) -> ChatCompletionRequestMessage:
    out: dict[str, object] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [c.template_dict() for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return cast("ChatCompletionRequestMessage", out)
