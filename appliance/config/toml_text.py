"""Writing TOML, in the few shapes the appliance writes (config files, catalog entries, the config reference):
tables of scalars and lists, and arrays of tables. ``tomllib`` reads it all back."""

from __future__ import annotations

import json
from collections.abc import Mapping


def value(v: object) -> str:
    """A TOML value: booleans, numbers, lists of values, and anything else as a string (a path, say)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def table(name: str, values: Mapping[str, object], *, array: bool = False) -> list[str]:
    """The lines of ``[name]`` (or ``[[name]]``, one table of an array) and its keys."""
    return [f"[[{name}]]" if array else f"[{name}]"] + [f"{k} = {value(v)}" for k, v in values.items()]
