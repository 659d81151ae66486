"""Decoding request payloads that anyone on the network may have written: every way JSON can be hostile becomes a
:class:`~appliance.errors.BadRequest` that says what was wrong, never an exception from deep inside the service.

Refused besides malformed JSON: bytes that are not UTF-8; nesting deeper than :data:`MAX_DEPTH` (a request needs
four levels; 100,000 would overflow the parser's stack); ``NaN``, ``Infinity`` and numbers too large for a float
(``1e999``); integers of more than 4,300 digits (Python's own limit on converting them); the same key twice in one
object (which value would win is a guess); strings holding lone UTF-16 surrogates (``"\\ud800"``), which cannot be
written back as UTF-8 in a reply. Each message names the problem and where it is, never the request's text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from appliance.errors import BadRequest

MAX_DEPTH = 32


class _Refused(ValueError):
    """Raised by the decoder's hooks; becomes a BadRequest with its message."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is too large")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"the key {_shown(key)} appears twice in one object")
        obj[key] = value
    return obj


def _shown(key: str) -> str:
    return repr(key[:40] + "..." if len(key) > 40 else key)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_tree(value: Any) -> None:
    """Depth and strings of a decoded document, without recursion (the document is the attacker's)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise _Refused(f"it is nested more than {MAX_DEPTH} levels deep")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str) and _has_surrogate(key):
                    raise _Refused("an object key holds a lone UTF-16 surrogate (not a character)")
                stack.append((child, depth + 1))
        elif isinstance(item, str) and _has_surrogate(item):
            raise _Refused("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff is not a character)")


def decode_json(payload: bytes | str, *, limit: int) -> Any:
    """Decode a request payload; every failure is a :class:`BadRequest` that says what was wrong."""
    if len(payload) > limit:
        raise BadRequest(f"payload is {len(payload)} bytes, larger than the limit of {limit}")
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    except UnicodeDecodeError as exc:
        raise BadRequest(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite,
                           object_pairs_hook=_unique_keys)
        _check_tree(value)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _Refused as exc:
        raise BadRequest(f"payload refused: {exc}") from None
    except RecursionError:
        raise BadRequest(f"payload refused: it is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # int() past its digit limit
        raise BadRequest(f"payload refused: {str(exc).split(':')[0]}") from None
    return value
