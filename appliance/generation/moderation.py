"""The moderation filter (OpenChatKit's idea): an ONNX text classifier from the catalog, run on the prompt or the
messages of every generate request before the language model sees them. Off unless ``moderation.model`` names one.

The scheduler hands each accepted job to :meth:`Moderator.check`, which returns at once (transports never wait):
the texts become feature rows (text_features.py, as the model's catalog entry declares with ``featurize``), the ONNX
worker that serves the infer routes classifies them, and when its answer comes back the job is released to the
queue, or refused with ``moderated`` naming the prompt or the message when a label of ``moderation.block`` scores at
or above ``moderation.threshold``. A classifier that cannot answer (file missing, worker crashed, timeout) refuses
the request too: a filter that lets text through whenever it fails filters nothing.

Request text is never in a message or a log line; the refusal names the label and its score. A cancel that arrives
while the classifier looks is answered at once by the scheduler, which then drops the job when the classifier hands
it over: no token is generated for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.catalog import Catalog
from appliance.config.schema import Config, ModerationConfig
from appliance.errors import ApplianceError, ModelError, Moderated, error_from_code
from appliance.generation.jobs import Job
from appliance.protocol import GenerateRequest, TensorResult
from appliance.tensors import features as text_features
from appliance.tensors.pool import Answer, InferencePool

log = logging.getLogger(__name__)


def config_problems(config: Config, catalog: Catalog) -> list[str]:
    """What is wrong with the ``[moderation]`` keys against this catalog (checked at start, naming the key)."""
    m = config.moderation
    if not m.model:
        return []
    where = f"moderation.model = {m.model!r}"
    if m.model not in catalog:
        return [f"{where}: not in the catalog {catalog.origin} (available: {', '.join(catalog.ids) or 'none'})"]
    entry = catalog.get(m.model)
    if entry.backend != "onnx" or not entry.featurize:
        return [f"{where}: the filter needs an onnx text classifier whose catalog entry declares `featurize` "
                f"(this is a {entry.backend} model{'' if entry.backend != 'onnx' else ' without featurize'})"]
    labelled = [o for o in entry.outputs if o.labels]
    output = next((o for o in entry.outputs if o.name == m.output), None) if m.output else \
        (labelled[0] if labelled else None)
    if output is None:
        known = ", ".join(o.name for o in entry.outputs) or "none declared"
        return [f"moderation.output = {m.output!r}: model '{m.model}' declares no such output (outputs: {known})"
                if m.output else f"{where}: the catalog entry declares no output with labels"]
    if not output.labels or output.threshold is not None:
        return [f"{where}: output '{output.name}' must declare labels, one score per label (not a threshold)"]
    missing = [label for label in _blocked(m) if label not in output.labels]
    if missing:
        return [f"moderation.block = {m.block!r}: {', '.join(repr(x) for x in missing)} is not a label of output "
                f"'{output.name}' (labels: {', '.join(output.labels)})"]
    return []


def _blocked(m: ModerationConfig) -> tuple[str, ...]:
    return tuple(label.strip() for label in m.block.split(",") if label.strip())


def _texts(request: GenerateRequest) -> tuple[list[str], list[str]]:
    """(the request field each text came from, the texts)."""
    if request.messages is None:
        return ["prompt"], [request.prompt or ""]
    return [f"messages[{i}]" for i in range(len(request.messages))], [m.content for m in request.messages]


class Moderator:
    """Checks each job's text with the classifier; built only when ``moderation.model`` is set (and valid)."""

    def __init__(self, config: ModerationConfig, catalog: Catalog, pool: InferencePool) -> None:
        self.entry = catalog.get(config.model)
        assert self.entry.featurize is not None  # config_problems() refused a classifier without it
        self.featurize = self.entry.featurize
        self.input = self.entry.inputs[0]
        self.output = config.output or next(o.name for o in self.entry.outputs if o.labels)
        self.block = _blocked(config)
        self.threshold = config.threshold
        self.pool = pool

    def check(self, job: Job, release: Callable[[], None]) -> None:
        """Classify the job's text; ``release()`` runs once the verdict is in ``job.stop_reason`` (None: passed)."""
        fields, texts = _texts(job.request)
        arrays = {self.input.name: text_features.featurize(self.featurize, texts, self.input)}

        def answered(answer: Answer) -> None:
            verdict = self._verdict(answer, fields, job.request.id)
            if verdict is not None and job.stop_reason is None:
                job.stop_reason = verdict
            release()

        try:
            self.pool.enqueue(self.entry.id, job.request.id, arrays, answered, None)
        except ApplianceError as exc:  # busy or overheated: refused like the request itself would be
            job.stop_reason = exc
            release()

    def _verdict(self, answer: Answer, fields: list[str], rid: str | int) -> ApplianceError | None:
        if isinstance(answer, ApplianceError):
            return error_from_code(answer.code, f"the moderation filter could not check this request: "
                                                f"{answer.message}")
        if not isinstance(answer, TensorResult):  # the pool answers an Infer with a TensorResult or an error
            return ModelError(f"moderation model '{self.entry.id}' answered with no tensors")
        rows = answer.outputs.get(self.output, {}).get("scores")
        if not isinstance(rows, list) or len(rows) != len(fields):
            return ModelError(f"moderation model '{self.entry.id}': output '{self.output}' gave no score per label "
                              f"for each text; it must have one column per declared label")
        for field, scores in zip(fields, rows, strict=True):
            for label in self.block:
                score = scores.get(label)
                if score is not None and score >= self.threshold:
                    log.info("request %r refused by the moderation filter: %s %.3f in %s", rid, label, score,
                             field)
                    return Moderated(f"'{field}' was refused by the moderation filter: '{label}' scored "
                                     f"{score:.2f} (moderation.threshold = {self.threshold:g})", param=field)
        return None
