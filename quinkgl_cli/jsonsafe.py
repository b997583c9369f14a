"""JSON as a peer may send it: the one parser for bytes that arrive over the network (tensor headers, control
bodies, offer meta).

`loads_strict` refuses what Python's `json` accepts but no later arithmetic should meet: the constants NaN,
Infinity and -Infinity, numbers beyond float range (``1e400`` parses to infinity), and nesting deeper than
``MAX_DEPTH`` (Python's parser raises RecursionError past ~1000 levels). Integers longer than 4300 digits are
refused by the interpreter itself. Everything refused raises ValueError. Imports nothing of the package.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # arrays and objects inside each other


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} overflows a float")
    return value


def depth(value: Any) -> int:
    """Nesting depth of arrays and objects (a scalar is 0), without recursion."""
    level: list[Any] = [value] if isinstance(value, (dict, list)) else []
    deepest = 0
    while level:  # one level of containers at a time: the depth is the number of levels
        deepest += 1
        below: list[Any] = []
        for item in level:
            below += [c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, (dict, list))]
        level = below
    return deepest


# One decoder for every call: ``json.loads`` with hooks builds a new one each time, a fifth of a small body's parse.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def loads_strict(text: str) -> Any:
    """Parse ``text``; ValueError (UnicodeDecodeError included) for anything but finite, shallow JSON."""
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # Each level of nesting opens with a bracket, so text with at most MAX_DEPTH of them (the common small header or
    # body) cannot nest deeper; only longer text pays for the walk.
    if text.count("[") + text.count("{") > MAX_DEPTH and depth(value) > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value
