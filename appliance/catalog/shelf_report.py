"""The model shelf as text: the lines `appliance models fit` prints for it, and the Markdown of docs/models.md's
"The model shelf" section (`appliance models shelf --markdown`; a unit test keeps the doc and this in step)."""

from __future__ import annotations

from appliance.backends.probe import MiB
from appliance.catalog import shelf
from appliance.config.schema import Config


def fit_lines(available: int, config: Config) -> list[str]:
    """One line per shelf model: verdict, id, what it is, and why (indented, so they never read as catalog lines)."""
    lines = ["shelf (docs/models.md; sizes computed for Q4 files, not read from one):"]
    for model in shelf.MODELS:
        result = shelf.fit(model, available, config)
        lines.append(f"  {result.verdict.upper() if result.verdict == 'too big' else result.verdict:8} {model.id} "
                     f"({model.name} {model.quant}, {model.languages}, {model.licence}): {result.why}")
    return lines


def board_source(board: shelf.Board) -> str:
    return (f"planned for {board.name}: {board.ram_mib} MiB of RAM less {shelf.OS_RESERVE_MIB} for the OS "
            f"(--board {board.id})")


def _published(model: shelf.ShelfModel) -> str:
    rows = shelf.PUBLISHED.get(model.id, ())
    return "; ".join(f"{p.board} {p.tokens_per_s:g} ({p.model}, {p.engine})" for p in rows) or "none found"


def markdown(config: Config) -> str:
    """The shelf and the per-board verdicts, under this config's context and batch size."""
    out = [f"Memory below is what the admission check would compute under `worker.context_size = "
           f"{config.worker.context_size}` and `worker.batch_size = {config.worker.batch_size}`, "
           f"`memory.margin_mib = {config.memory.margin_mib}` included.", "",
           "| id | model | quant | languages | licence | weights | needs (estimate) | published generation tok/s |",
           "|---|---|---|---|---|---|---|---|"]
    for m in shelf.MODELS:
        need = shelf.fit(m, 1 << 60, config).footprint
        weights = f"{m.weights / MiB:.0f} MiB" + ("" if m.file_size else " (computed)")
        note = f": {m.note}" if m.note else ""
        out.append(f"| `{m.id}` | [{m.name}]({m.source}){note} | {m.quant} | {m.languages} | {m.licence} | "
                   f"{weights} | {need.total / MiB:.0f} MiB | {_published(m)} |")
    out += ["", "| board | planned free memory | English | multilingual (es, zh) "
                "| `appliance models fit --board` says |", "|---|---|---|---|---|"]
    for b in shelf.BOARDS:
        verdicts: dict[str, list[str]] = {}
        for m in shelf.MODELS:
            verdicts.setdefault(shelf.fit(m, b.available_mib * MiB, config).verdict, []).append(f"`{m.id}`")
        said = "; ".join(f"{v}: {', '.join(ids) if len(ids) < len(shelf.MODELS) else f'all {len(ids)}'}"
                         for v, ids in sorted(verdicts.items(), key=lambda kv: _ORDER[kv[0]]))
        image = "" if b.image else " (no image: Raspberry Pi OS and `make run`)"
        out.append(f"| {b.name}, {b.cpu}{image} | {b.available_mib} MiB (`--board {b.id}`) | `{b.english}` | "
                   f"`{b.multilingual}` | {said} |")
    return "\n".join(out) + "\n"


_ORDER = {"fits": 0, "tight": 1, "too big": 2}
