"""Embeddings per second on the built-in embedder (all-MiniLM-L6-v2 int8): through the appliance's
``/v1/embeddings`` (the real ``openai`` client; batches of 16 texts and single texts) and in-process (the worker's
own code, tensors/embedder.py, with no HTTP and no process hop), the same texts and thread count on both.

    .venv/bin/python -m bench.embeddings            # prints its section; `make bench` puts it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai

from appliance.backends.onnx import OnnxSessions
from appliance.catalog import default_embedder
from appliance.tensors.embedder import Embedder
from bench.report_sections import replace_section
from tests.support.harness import new_appliance

# sentences of a typical passage length (20-30 words): what a document search embeds
TEXTS = [f"Passage {i}: the Raspberry Pi in the greenhouse reads the soil sensors every ten minutes and reports "
         f"when the tomatoes need water{', the fan needs cleaning' * (i % 3)}." for i in range(64)]


def _rate(call, texts: list[str], batch: int, rounds: int) -> float:
    """Median embeddings per second over ``rounds`` passes through ``texts`` in batches of ``batch``."""
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            call(texts[i:i + batch])
        rates.append(len(texts) / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(rounds: int) -> dict[str, float] | None:
    entry = default_embedder.entry()
    if entry is None:
        return None
    embedder = Embedder(OnnxSessions(verify=False))
    embedder.embed(entry, TEXTS[:2], truncate=False)  # open the session before the clock starts
    result = {"in-process, batches of 16": _rate(lambda t: embedder.embed(entry, t, False), TEXTS, 16, rounds),
              "in-process, one text a call": _rate(lambda t: embedder.embed(entry, t, False), TEXTS, 1, rounds)}
    with tempfile.TemporaryDirectory(prefix="appliance-bench-embed-") as tmp:
        workdir = Path(tmp)
        app = new_appliance(workdir, None, workdir / "no-catalog.toml", "smollm2-135m-instruct",
                            {"logging": {"level": "warning"}})
        app.config["models"].pop("catalog")  # the built-in catalog: the default model and the embedder
        app.start(timeout=180)
        try:
            client = openai.OpenAI(base_url=app.http_url + "/v1", api_key="unused", timeout=120)
            model = default_embedder.MODEL_ID
            client.embeddings.create(model=model, input=TEXTS[:2])
            result["/v1/embeddings, batches of 16"] = _rate(
                lambda t: client.embeddings.create(model=model, input=t), TEXTS, 16, rounds)
            result["/v1/embeddings, one text a call"] = _rate(
                lambda t: client.embeddings.create(model=model, input=t), TEXTS, 1, rounds)
        finally:
            app.stop()
    return result


def section(rounds: int = 3) -> str:
    result = measure(rounds)
    if result is None:
        return (f"\n## Embeddings\n\nNot measured: the embedding model is not installed "
                f"({default_embedder.INSTALL_HINT}).\n")
    words = [len(t.split()) for t in TEXTS]
    lines = ["", "## Embeddings", "",
             f"`{default_embedder.MODEL_ID}` (all-MiniLM-L6-v2 int8 ONNX, onnxruntime with one intra-op thread, as the "
             f"ONNX worker runs it), {len(TEXTS)} passages of {min(words)}-{max(words)} words, median of {rounds} "
             f"passes:", "",
             "| path | embeddings/s |", "|---|---|"]
    lines += [f"| {name} | {rate:.1f} |" for name, rate in result.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="put the section in this file, between its embeddings markers "
                        "(docs/benchmarks.md; bench/report_sections.py)")
    args = parser.parse_args(argv)
    text = section(args.rounds)
    if args.out is not None:
        replace_section(args.out, "embeddings", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
