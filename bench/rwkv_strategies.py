"""`make bench-rwkv`: the RWKV backend against the rwkv package on its own, under each CPU strategy.

One random RWKV-6 World checkpoint in the real layout (default 92M parameters: the World vocabulary's embedding and
head are most of it, as in the small released models). Every measurement runs in a fresh process, so peak RSS is
that configuration's own; runs are interleaved in rounds (raw fp32, appliance fp32, raw bf16, ...) so drift hits
all alike. Figures are medians over rounds, as ratios to the raw package under ``cpu fp32`` measured in the same run:

- decode speed: generated tokens / time from the first sampled token to the last (greedy, no early stop);
- memory: RSS after load, and peak RSS over load plus generation (``ru_maxrss``), with the appliance's admission
  estimate beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from appliance import __version__
from appliance.backends.probe import MiB

STRATEGIES = ("cpu fp32", "cpu bf16", "cpu fp32i8")
PROMPT = "The weather station on the hill reports that the river is rising and the wind is strong tonight,"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(spec: dict) -> dict:
    """One configuration, measured in this (fresh) process."""
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch

    torch.set_num_threads(spec["threads"])
    path, strategy, tokens = Path(spec["model"]), spec["strategy"], spec["tokens"]
    started = time.perf_counter()
    if spec["path"] == "raw":
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV
            from rwkv.utils import PIPELINE
            model = RWKV(str(path.with_suffix("")), strategy, verbose=False)
        pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
        loaded, resident = time.perf_counter() - started, _rss()
        out, state = model.forward(pipeline.encode(PROMPT), None)
        decode_started, generated = time.perf_counter(), []
        while len(generated) < tokens:
            token = int(torch.argmax(out))
            generated.append(token)
            out, state = model.forward([token], state)
        decode_s = time.perf_counter() - decode_started
        text = pipeline.decode(generated)
    else:
        from appliance.backends.base import EngineSettings, GenerationTask
        from appliance.backends.rwkv import RwkvBackend
        from appliance.catalog import ModelEntry
        from appliance.protocol import SamplingParams

        backend = RwkvBackend(EngineSettings(threads=spec["threads"], context_size=4096, batch_size=256))
        backend.load(ModelEntry(id="bench", path=path, sha256=None, backend="rwkv", strategy=strategy))
        loaded, resident = time.perf_counter() - started, _rss()
        task = GenerationTask(prompt=PROMPT, messages=None, params=SamplingParams(max_tokens=tokens, temperature=0))
        *_, done = backend.generate(task, lambda: False)
        decode_s, text = done.usage.completion_tokens / done.tokens_per_s, done.text
    return {"load_s": loaded, "decode_tok_s": tokens / decode_s, "resident_mib": resident / MiB,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB, "text": text}


def _run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.rwkv_strategies", "--child", json.dumps(spec)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['path']} {spec['strategy']}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _estimate_mib(model: Path, strategy: str) -> float:
    from appliance.catalog import ModelEntry
    from appliance.config.loader import load_config
    from appliance.supervisor import admission

    config = load_config(None, env={})
    footprint = admission.estimate(ModelEntry(id="m", path=model, sha256=None, backend="rwkv", strategy=strategy),
                                   config)
    return (footprint.total - footprint.margin) / MiB


def measure(model: Path, args: argparse.Namespace) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_number in range(args.rounds):
        order = [(p, s) for s in STRATEGIES for p in ("raw", "appliance")]
        order = order[round_number % len(order):] + order[:round_number % len(order)]
        for path, strategy in order:
            spec = {"model": str(model), "strategy": strategy, "path": path, "tokens": args.tokens,
                    "threads": args.threads}
            runs.setdefault((path, strategy), []).append(_run_child(spec))
            print(f"round {round_number + 1}: {path:9} {strategy:11} "
                  f"{runs[(path, strategy)][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    return runs


def report(runs: dict, model: Path, args: argparse.Namespace) -> str:
    from appliance.catalog.pth_meta import read_checkpoint

    checkpoint = read_checkpoint(model)
    baseline = statistics.median(r["decode_tok_s"] for r in runs[("raw", "cpu fp32")])
    base_peak = statistics.median(r["peak_mib"] for r in runs[("raw", "cpu fp32")])
    same_text = {s: len({r["text"] for p in ("raw", "appliance") for r in runs[(p, s)]}) == 1 for s in STRATEGIES}
    lines = [
        "# RWKV benchmark", "",
        f"Generated by `make bench-rwkv` (`python -m bench.rwkv_strategies --tokens {args.tokens} "
        f"--rounds {args.rounds} --embd {args.embd} --layers {args.layers}`) on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Figures are only comparable within one run.", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{platform.machine()}, Python {platform.python_version()}; {args.threads} torch thread(s)",
        f"- model: random RWKV-6 World checkpoint, {checkpoint.n_layer} layers, embedding {checkpoint.n_embd}, "
        f"{checkpoint.parameters / 1e6:.0f}M parameters, bf16 file of {model.stat().st_size / MiB:.0f} MiB; "
        f"rwkv package {_rwkv_version()}, appliance {__version__}",
        f"- each configuration in a fresh process, {args.rounds} rounds; greedy, {args.tokens} tokens after a "
        f"{len(PROMPT)}-character prompt; medians",
        "- same text from the package and the appliance: "
        + ", ".join(f"{s}: {'yes' if same_text[s] else 'NO'}" for s in STRATEGIES), "",
        "| strategy | path | decode tok/s | ratio to raw fp32 | load s | RSS after load MiB | peak RSS MiB "
        "| peak ratio to raw fp32 | admission estimate MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        estimate = _estimate_mib(model, strategy)
        for path in ("raw", "appliance"):
            rs = runs[(path, strategy)]
            speed = statistics.median(r["decode_tok_s"] for r in rs)
            peak = statistics.median(r["peak_mib"] for r in rs)
            lines.append(f"| {strategy} | {'rwkv package' if path == 'raw' else 'appliance backend'} | {speed:.1f} "
                         f"| {speed / baseline:.3f} | {statistics.median(r['load_s'] for r in rs):.2f} "
                         f"| {statistics.median(r['resident_mib'] for r in rs):.0f} | {peak:.0f} "
                         f"| {peak / base_peak:.2f} | {estimate:.0f} |")
    lines += ["", "The admission estimate leaves out `memory.margin_mib`; it should be at or above the peak.", ""]
    return "\n".join(lines)


def _rwkv_version() -> str:
    from importlib.metadata import version
    return version("rwkv")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-rwkv.md"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from tests.support import tiny_rwkv
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_rwkv.write(6, Path(tmp) / "bench-v6.pth", n_embd=args.embd, n_layer=args.layers)
        text = report(measure(model, args), model, args)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
