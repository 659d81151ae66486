"""Generated sections inside a hand-written document: docs/reliability.md keeps its prose, and `make fuzz` and
`make soak` each replace only the block between their markers (``<!-- fuzz:begin -->`` ... ``<!-- fuzz:end -->``)."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of section ``name`` in ``path``; append the section when it is missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    document = path.read_text() if path.exists() else ""
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        document = head + block + rest.split(end, 1)[1]
    else:
        document = document.rstrip("\n") + ("\n\n" if document else "") + block + "\n"
    path.write_text(document)
