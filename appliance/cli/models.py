"""`appliance models ...`: list, verify, fit, add and quantize catalog models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.catalog import Catalog, families, shelf, shelf_report
from appliance.config import Config, ConfigError, load_config
from appliance.errors import ApplianceError, ModelError

QUANT_TYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}  # llama.cpp's llama_ftype values


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="the model catalog")
    actions = models.add_subparsers(dest="action", required=True)
    for name, text in (("list", "list catalog entries, with their licence flag"),
                       ("verify", "check files and sha256 digests"),
                       ("fit", "estimate the memory of each catalog and shelf model and compare it with this "
                               "machine's (or a board's)"),
                       ("shelf", "the recommended models per board (docs/models.md)")):
        p = actions.add_parser(name, help=text)
        p.add_argument("-c", "--config")
        if name == "list":
            p.add_argument("--json", action="store_true")
        elif name == "verify":
            p.add_argument("ids", nargs="*", help="only these model ids")
        elif name == "fit":
            p.add_argument("--board", help="compare with this board's planned free memory instead: "
                                           "one of " + ", ".join(b.id for b in shelf.BOARDS))
        elif name == "shelf":
            p.add_argument("--markdown", action="store_true", help="the table docs/models.md holds")

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
    p.add_argument("--system-prompt", help="system message put before a chat request that has none (default: none; "
                                           "models.system_prompt replaces it)")
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
    if args.action == "shelf":
        return _shelf(args, config)
    from appliance.service import load_catalog
    catalog = load_catalog(config)
    if args.action == "fit":
        return _fit(config, catalog, args.board)
    if args.action == "list":
        return _list(args, config, catalog)
    return _verify(args, catalog)


def _list(args: argparse.Namespace, config: Config, catalog: Catalog) -> int:
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


def _verify(args: argparse.Namespace, catalog: Catalog) -> int:
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


def _fit(config: Config, catalog: Catalog, board_id: str | None = None) -> int:
    """The memory estimate of each catalog model, then of each shelf model, against what this machine has now (or
    what a board would have); the exit status is about the catalog's models only."""
    from appliance.backends.probe import MiB
    from appliance.supervisor import admission
    from appliance.supervisor.sensors import Sensors

    board = shelf.board(board_id) if board_id else None
    if board_id and board is None:
        raise ConfigError([f"--board {board_id!r}: unknown board (known: {', '.join(b.id for b in shelf.BOARDS)})"])
    reading = Sensors(config.memory, config.thermal, config.gpio).memory()
    if board is not None:
        available, source = board.available_mib * MiB, shelf_report.board_source(board)
    elif config.memory.budget_mib:
        available, source = config.memory.budget_mib * MiB, "memory.budget_mib"
    elif reading is not None:
        available, source = reading.available, f"MemAvailable in {config.memory.meminfo_path}"
    else:
        available, source = None, "unknown"
    shown = "?" if available is None else f"{available / MiB:.0f} MiB"
    print(f"available: {shown} ({source}); context {config.worker.context_size}, batch {config.worker.batch_size}")
    misfits = 0
    for entry in catalog:
        if not entry.path.is_file():
            first_start = " (`appliance serve` copies the default model there on its first start)" \
                if catalog.origin == "built-in" else ""
            print(f"?        {entry.id}: no file at {entry.path} yet{first_start}")
            continue
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
    if available is not None:
        print("\n".join(shelf_report.fit_lines(available, config)))
    return 1 if misfits else 0


def _shelf(args: argparse.Namespace, config: Config) -> int:
    if args.markdown:
        print(shelf_report.markdown(config), end="")
        return 0
    for model in shelf.MODELS:
        print(f"{model.id}: {model.name} {model.quant}; {model.languages}; {model.licence}; {model.source}"
              + (f"; {model.note}" if model.note else ""))
    for board in shelf.BOARDS:
        print(f"{board.id}: {board.name}: English {board.english}, multilingual {board.multilingual}")
    return 0


def _add(args: argparse.Namespace, config: Config, path: Path) -> int:
    from appliance.catalog import writer
    catalog_path = args.catalog or config.catalog_path
    commercial = {"true": True, "false": False, "unknown": None, None: "default"}[args.commercial_use]
    labels = tuple(x.strip() for x in (getattr(args, "labels", None) or "").split(",") if x.strip())
    new = writer.NewEntry(path=path, family=args.family, id=args.id, template=args.template, licence=args.licence,
                          commercial_use=commercial, source=args.source, lora=getattr(args, "lora", None),
                          lora_scale=getattr(args, "lora_scale", 1.0), tokenizer=getattr(args, "tokenizer", None),
                          strategy=getattr(args, "strategy", None), featurize=getattr(args, "featurize", None),
                          labels=labels, threshold=getattr(args, "threshold", None),
                          system_prompt=args.system_prompt)
    keys, facts = writer.build(new, catalog_path.parent)
    writer.append(catalog_path, keys)
    described = ", ".join(f"{k} {v}" for k, v in facts.items() if v not in (None, False)) or "no header facts"
    template = "" if "inputs" in keys else f"template {keys.get('template', 'from the GGUF')}; "
    print(f"added {keys['id']} to {catalog_path}: {keys['size']} bytes, sha256 {keys['sha256']}; {described}; "
          f"{template}licence {keys['licence']} (commercial use: {keys['commercial_use']})")
    if keys["commercial_use"] is False and not config.models.allow_noncommercial:
        print("note: this model is refused until models.allow_noncommercial = true", file=sys.stderr)
    return 0


def _quantize(args: argparse.Namespace, config: Config) -> int:
    """llama.cpp's own quantizer; it prints a line per tensor as it goes (the progress)."""
    import llama_cpp

    from appliance.backends.llama_probe import check_architecture
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
