"""`appliance models ...`: list, verify, fit, add and quantize catalog models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance import families
from appliance.config import Config, load_config
from appliance.errors import ApplianceError, ModelError

QUANT_TYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}  # llama.cpp's llama_ftype values


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="the model catalog")
    actions = models.add_subparsers(dest="action", required=True)
    for name, text in (("list", "list catalog entries, with their licence flag"),
                       ("verify", "check files and sha256 digests"),
                       ("fit", "estimate each model's memory and compare with this machine's")):
        p = actions.add_parser(name, help=text)
        p.add_argument("-c", "--config")
        if name == "list":
            p.add_argument("--json", action="store_true")
        elif name == "verify":
            p.add_argument("ids", nargs="*", help="only these model ids")

    add = actions.add_parser("add", help="add a model file (.gguf, .pth, .onnx) to the catalog (digest, size and "
                                         "header facts computed)")
    add.add_argument("file", type=Path)
    _entry_options(add)
    add.add_argument("--lora", type=Path, help="a LoRA adapter GGUF applied at load (Alpaca-LoRA)")
    add.add_argument("--lora-scale", type=float, default=1.0)
    add.add_argument("--tokenizer", type=Path, help="RWKV: a Raven model's 20B_tokenizer.json (World models need none)")
    add.add_argument("--strategy", help="RWKV: e.g. 'cpu fp32' (default: worker.rwkv_strategy)")
    add.add_argument("--labels", help="ONNX: comma-separated labels of the first output (one per score, or per class "
                                      "index)")
    add.add_argument("--threshold", type=float, help="ONNX: the first output is one score per row: the second label "
                                                      "at or above this, else the first")
    add.add_argument("--featurize", help="ONNX: a text classifier for the moderation filter; how text becomes its "
                                         "input (hashed-words)")

    quantize = actions.add_parser("quantize", help="quantize a GGUF with llama.cpp and add the result to the catalog")
    quantize.add_argument("source", type=Path, metavar="IN.gguf")
    quantize.add_argument("file", type=Path, metavar="OUT.gguf")
    quantize.add_argument("--type", required=True, choices=sorted(QUANT_TYPES))
    quantize.add_argument("--threads", type=int, default=0, help="0: all cores")
    _entry_options(quantize)
    models.set_defaults(func=cmd_models)


def _entry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config")
    p.add_argument("--family", required=True, help=f"one of: {', '.join(families.names())} (or your own)")
    p.add_argument("--id", help="catalog id (default: from the file name)")
    p.add_argument("--template", help="prompt format; overrides a chat template the GGUF embeds (default: the "
                                      "GGUF's own, else the family's)")
    p.add_argument("--licence", help="licence text (default: the family's)")
    p.add_argument("--commercial-use", choices=("true", "false", "unknown"), help="default: the family's")
    p.add_argument("--source", help="where the weights come from (URL)")
    p.add_argument("--catalog", type=Path, help="catalog file (default: models.catalog of the config)")


def cmd_models(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.action == "add":
        return _add(args, config, args.file)
    if args.action == "quantize":
        return _quantize(args, config)
    from appliance.service import load_catalog
    catalog = load_catalog(config)
    if args.action == "fit":
        return _fit(config, catalog)
    if args.action == "list":
        return _list(args, config, catalog)
    return _verify(args, catalog)


def _list(args, config: Config, catalog) -> int:
    if args.json:
        print(json.dumps([e.describe() for e in catalog], indent=2))
        return 0
    print(f"catalog: {catalog.origin}")
    use = {True: "commercial use allowed", False: "NON-COMMERCIAL only", None: "commercial use unknown"}
    for e in catalog:
        present = "present" if e.path.is_file() else "MISSING"
        default = " (default)" if e.id == config.models.default else ""
        refused = "" if config.models.allow_noncommercial or e.commercial_use is not False else \
            " (refused: models.allow_noncommercial is false)"
        extra = f"\n  lora: {e.lora} (scale {e.lora_scale})" if e.lora else ""
        print(f"{e.id}{default}\n  file: {e.path} [{present}]\n  family: {e.family}  template: "
              f"{e.template or 'from GGUF'}  backend: {e.backend}{extra}\n  licence: {e.licence}; "
              f"{use[e.commercial_use]}{refused}")
    return 0


def _verify(args, catalog) -> int:
    from appliance.catalog import verify
    failures = 0
    for e in catalog:
        if args.ids and e.id not in args.ids:
            continue
        try:
            verify(e)
            print(f"ok       {e.id}  {e.path}")
        except ApplianceError as exc:
            failures += 1
            print(f"FAILED   {e.id}  {exc.message}")
    for model_id in sorted(set(args.ids) - set(catalog.ids)):
        failures += 1
        print(f"FAILED   {model_id}  not in the catalog")
    return 1 if failures else 0


def _fit(config: Config, catalog) -> int:
    """The memory estimate of each model against what this machine has now."""
    from appliance import admission
    from appliance.sensors import MiB, Sensors

    reading = Sensors(config.memory, config.thermal, config.gpio).memory()
    if config.memory.budget_mib:
        available, source = config.memory.budget_mib * MiB, "memory.budget_mib"
    elif reading is not None:
        available, source = reading.available, f"MemAvailable in {config.memory.meminfo_path}"
    else:
        available, source = None, "unknown"
    shown = "?" if available is None else f"{available / MiB:.0f} MiB"
    print(f"available: {shown} ({source}); context {config.worker.context_size}, batch {config.worker.batch_size}")
    misfits = 0
    for entry in catalog:
        try:
            footprint = admission.estimate(entry, config)
        except ApplianceError as exc:
            print(f"?        {entry.id}: {exc.message}")
            continue
        if footprint is None:
            print(f"?        {entry.id}: no estimate for {entry.path.suffix} files")
            continue
        fits = available is None or footprint.total <= available
        misfits += not fits
        print(f"{'fits' if fits else 'TOO BIG':8} {entry.id}: {footprint.describe()}")
        print(f"{'':8} {admission.on_a_1gib_pi(footprint)}")
    return 1 if misfits else 0


def _add(args, config: Config, path: Path) -> int:
    from appliance.catalog import writer
    catalog_path = args.catalog or config.catalog_path
    commercial = {"true": True, "false": False, "unknown": None, None: "default"}[args.commercial_use]
    labels = tuple(x.strip() for x in (getattr(args, "labels", None) or "").split(",") if x.strip())
    new = writer.NewEntry(path=path, family=args.family, id=args.id, template=args.template, licence=args.licence,
                          commercial_use=commercial, source=args.source, lora=getattr(args, "lora", None),
                          lora_scale=getattr(args, "lora_scale", 1.0), tokenizer=getattr(args, "tokenizer", None),
                          strategy=getattr(args, "strategy", None), featurize=getattr(args, "featurize", None),
                          labels=labels, threshold=getattr(args, "threshold", None))
    keys, facts = writer.build(new, catalog_path.parent)
    writer.append(catalog_path, keys)
    described = ", ".join(f"{k} {v}" for k, v in facts.items() if v not in (None, False)) or "no header facts"
    template = "" if "inputs" in keys else f"template {keys.get('template', 'from the GGUF')}; "
    print(f"added {keys['id']} to {catalog_path}: {keys['size']} bytes, sha256 {keys['sha256']}; {described}; "
          f"{template}licence {keys['licence']} (commercial use: {keys['commercial_use']})")
    if keys["commercial_use"] is False and not config.models.allow_noncommercial:
        print("note: this model is refused until models.allow_noncommercial = true", file=sys.stderr)
    return 0


def _quantize(args, config: Config) -> int:
    """llama.cpp's own quantizer; it prints a line per tensor as it goes (the progress)."""
    import llama_cpp

    from appliance.backends.llama_archs import check_architecture
    check_architecture(args.source)
    if args.file.exists():
        raise ModelError(f"{args.file} exists already; choose another output file")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[args.type]
    params.nthread = args.threads
    print(f"quantizing {args.source} to {args.type} -> {args.file}", file=sys.stderr, flush=True)
    if llama_cpp.llama_model_quantize(str(args.source).encode(), str(args.file).encode(), params) != 0:
        args.file.unlink(missing_ok=True)
        raise ModelError(f"llama.cpp could not quantize {args.source} (see its messages above)")
    print(f"{args.file}: {args.file.stat().st_size} bytes (from {args.source.stat().st_size})", file=sys.stderr)
    return _add(args, config, args.file)
