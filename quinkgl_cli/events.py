"""Log events as data: the one place that decides how an event's fields look, in text and in JSON.

Code that logs an event calls `emit(logger, level, "event-name", key=value, ...)`. The fields ride on the log
record as normalized Python values (`normalize`); the text formatter prints them with `text_value`, the JSON
formatter writes the same values as JSON members. Nothing parses a formatted message back into fields.

Normalized values, and how text shows them (JSON shows the same value natively):

- ``None`` -> ``-``; ``True``/``False`` -> ``true``/``false``;
- ints as they are; floats rounded to 6 significant digits, written as Python's shortest repr (``0.401235``,
  ``1e-05``); a NaN or infinity becomes the string ``"nan"``/``"inf"``/``"-inf"`` (JSON has no such numbers);
- strings bare when they are one plain token (letters, digits and ``_ . : / @ + % -``) that cannot be read as
  anything else, otherwise JSON-quoted on one line (``hint="no peers found yet"``, tabs as ``\\t``);
- lists, tuples and sets as ``[a,b]`` of those element forms (sets sorted);
- anything else (paths, exceptions) as its ``str``.

This module sits below every other part of the package and imports none of it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

EVENT_ATTR = "qgl_event"
FIELDS_ATTR = "qgl_fields"
# Members of every JSON line; an event field with one of these names would be ambiguous, so `emit` refuses it.
RESERVED = frozenset({"ts", "level", "node", "round", "logger", "event", "traceback"})

_EVENT = re.compile(r"^[a-z][a-z0-9-]*( [a-z][a-z0-9-]*)?$")
_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+%-]+$")
_LITERALS = frozenset({"-", "true", "false", "nan", "inf", "-inf", "null"})

Scalar = None | bool | int | float | str
Value = Scalar | list[Scalar]


def _scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return float(f"{value:.6g}")
    return str(value)


def normalize(value: Any) -> Value:
    """The value an event carries for ``value``: what both renderings show."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return [_scalar(v) for v in value]
    return _scalar(value)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text_scalar(value: Scalar) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if _BARE.match(value) and value not in _LITERALS and not _reads_as_number(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def text_value(value: Value) -> str:
    """One normalized value as it appears after ``key=`` in a text line."""
    if isinstance(value, list):
        return "[" + ",".join(_text_scalar(v) for v in value) + "]"
    return _text_scalar(value)


def text_fields(fields: Mapping[str, Value]) -> str:
    return " ".join(f"{key}={text_value(value)}" for key, value in fields.items())


class EventMessage:
    """The record's message: rendered to text only when some handler asks for it."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: dict[str, Value]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        return f"{self.event} {text_fields(self.fields)}" if self.fields else self.event


def emit(logger: logging.Logger, level: int, event: str, /, *, exc_info: Any = None,
         context: Mapping[str, Any] | None = None, **fields: Any) -> None:
    """Log one event with its fields as data.

    ``context`` overrides the line's ``node``/``round`` (a node logging for itself in a process that runs many);
    ``exc_info`` attaches a traceback, folded into the line."""
    if not logger.isEnabledFor(level):
        return
    if not _EVENT.match(event):
        raise ValueError(f"event name {event!r} is not one or two lowercase hyphenated words")
    for key in fields:
        if key in RESERVED or not _KEY.match(key):
            raise ValueError(f"event field name {key!r} is reserved or not a lowercase identifier")
    values = {key: normalize(value) for key, value in fields.items()}
    extra: dict[str, Any] = {EVENT_ATTR: event, FIELDS_ATTR: values}
    if context:
        extra.update(context)
    logger.log(level, "%s", EventMessage(event, values), exc_info=exc_info, extra=extra, stacklevel=2)
