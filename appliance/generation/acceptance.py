"""What a request may ask of this device, decided from the catalog and the config alone (no queue, no worker, no
board readings): the model exists and may be switched to, it generates text, it can honour structured output and
tools, and its licence allows the use. Each refusal names the field that asked for too much. Then what the engine
is given: the request with the model's and the operator's defaults filled in."""

from __future__ import annotations

from appliance.backends.base import GenerationTask
from appliance.catalog import Catalog, licence_problem
from appliance.catalog.entry import ModelEntry
from appliance.config.schema import Config
from appliance.errors import BadRequest, ModelError, UnknownModel
from appliance.protocol import GenerateRequest, with_system_prompt

GRAMMAR_BACKENDS = ("llama_cpp",)  # engines that can constrain sampling to a grammar (JSON mode, schemas)


def requested_model(request: GenerateRequest, catalog: Catalog, config: Config) -> ModelEntry:
    """The catalog entry the request will run on, or the refusal (raised) that says why it cannot."""
    default = config.models.default
    model_id = request.model or default
    if model_id not in catalog or (model_id != default and not config.models.switch):
        available = catalog.ids if config.models.switch else [default]
        raise UnknownModel(f"unknown model '{model_id}' (available: {', '.join(available)})", param="model")
    entry = catalog.get(model_id)
    if entry.embeds:
        raise BadRequest(f"model '{model_id}' is an embedding model: send it text on /v1/embeddings, /api/embed "
                         f"or the embed topic", param="model")
    if not entry.generates_text:
        raise BadRequest(f"model '{model_id}' is a {entry.backend} model: send it tensors on the infer topic or "
                         f"POST /v1/infer/{model_id}", param="model")
    if request.structured is not None and entry.backend not in GRAMMAR_BACKENDS:
        raise BadRequest(f"model '{model_id}' ({entry.backend}) cannot constrain its output to JSON or a grammar; "
                         f"use a llama.cpp (GGUF) model", param="format")
    if request.uses_tools and (entry.backend not in GRAMMAR_BACKENDS or entry.template is not None):
        # a named prompt format (backends/templates.py) has no way to write tools into the prompt
        raise BadRequest(f"model '{model_id}' cannot call tools: tools need a GGUF model whose own chat template "
                         f"supports them (see docs/protocol.md)", param="tools")
    problem = licence_problem(entry, config.models.allow_noncommercial)
    if problem:
        raise ModelError(problem, param="model")
    return entry


def generation_task(request: GenerateRequest, entry: ModelEntry, config: Config) -> GenerationTask:
    """The request as the engine runs it: unset sampling parameters from the model's entry and the worker's
    defaults, the operator's (or the model's) system prompt added to a chat."""
    params = request.params.with_defaults(max_tokens=config.worker.default_max_tokens,
                                          temperature=entry.temperature, top_p=entry.top_p)
    messages = request.messages and with_system_prompt(request.messages,
                                                       config.models.system_prompt or entry.system_prompt)
    return GenerationTask(prompt=request.prompt, messages=messages, params=params, stream=request.stream,
                          structured=request.structured, tools=request.tools)
