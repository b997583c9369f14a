"""One event encoder: the text and the JSON rendering of an event carry the same fields with the same values."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.events import emit, normalize, text_value
from quinkgl_cli.node.logs import setup_logging

LINE = re.compile(r"^\S+ (?:INFO|WARNING|ERROR|DEBUG) (?P<node>\S+) round=(?P<round>\d+) (?P<rest>.*)$")
# A text value: a JSON string, a [list] (its elements never hold a bare `]` or space unquoted), or a bare token.
VALUE = r'"(?:[^"\\]|\\.)*"|\[(?:"(?:[^"\\]|\\.)*"|[^\]\s"])*\]|\S+'
FIELD = re.compile(rf"(?P<key>[a-z_][a-z0-9_]*)=(?P<value>{VALUE})(?: |$)")
SCALAR = re.compile(r'"(?:[^"\\]|\\.)*"|[^,]+')


def _scalar(text: str) -> Any:
    """How a reader of a text line turns one value back into data (the README documents these forms)."""
    if text.startswith('"'):
        return json.loads(text)
    if text == "-":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_text(line: str) -> tuple[str, dict[str, Any]]:
    m = LINE.match(line)
    assert m, line
    rest = m["rest"]
    event, _, tail = rest.partition(" ")
    if tail and not FIELD.match(tail):  # two-word event names ("caught up" style) keep their second word
        second, _, tail = tail.partition(" ")
        event = f"{event} {second}"
    fields: dict[str, Any] = {}
    pos = 0
    while pos < len(tail):
        f = FIELD.match(tail, pos)
        assert f, f"unreadable field at {tail[pos:]!r} in {line!r}"
        raw = f["value"]
        if raw.startswith("["):
            fields[f["key"]] = [_scalar(x) for x in SCALAR.findall(raw[1:-1])]
        else:
            fields[f["key"]] = _scalar(raw)
        pos = f.end()
    return event, fields


FIELDS: dict[str, Any] = {
    "flag": True,
    "off": False,
    "count": 3,
    "ratio": 0.123456789,
    "tiny": 1e-7,
    "missing": None,
    "nan_loss": float("nan"),
    "inf_norm": float("inf"),
    "peer": "peer-2",
    "addr": "127.0.0.1:7001",
    "quoted": 'say "hi"',
    "tabbed": "a\tb",
    "newline": "line1\nline2",
    "spaced": "no peers found yet",
    "numeric_text": "12",
    "literal_text": "true",
    "dash_text": "-",
    "empty": "",
    "unicode": "ağırlık",
    "peers": ["peer-1", "peer 2", 'q"x', "a,b", "x]y"],
    "rounds": (1, 2, 3),
    "tags": {"b", "a"},
    "path": Path("/tmp/x y"),
}


def _render(fmt: str) -> str:
    out = io.StringIO()
    ctx = setup_logging("peer-1", fmt, stream=out)
    ctx.round = 5
    emit(logging.getLogger("quinkgl.node"), logging.INFO, "round-end", **FIELDS)
    return out.getvalue()


def test_text_and_json_carry_identical_fields_and_values() -> None:
    text_line = _render("text")
    json_line = _render("json")
    assert text_line.count("\n") == 1 and json_line.count("\n") == 1, "one event, one line, in both renderings"
    event, text_fields = _read_text(text_line.rstrip("\n"))
    obj = json.loads(json_line)
    json_fields = {k: v for k, v in obj.items() if k not in ("ts", "level", "node", "round", "logger", "event")}
    assert event == obj["event"] == "round-end"
    assert list(text_fields) == list(json_fields) == list(FIELDS)
    assert text_fields == json_fields
    expected = {k: normalize(v) for k, v in FIELDS.items()}
    assert json_fields == expected
    # Spot checks of the documented forms, so a change of form is a visible decision.
    assert json_fields["flag"] is True and "flag=true" in text_line
    assert json_fields["missing"] is None and "missing=-" in text_line
    assert json_fields["nan_loss"] == "nan" and json_fields["inf_norm"] == "inf"
    assert json_fields["ratio"] == 0.123457
    assert 'tabbed="a\\tb"' in text_line and 'quoted="say \\"hi\\""' in text_line
    assert json_fields["tags"] == ["a", "b"] and json_fields["rounds"] == [1, 2, 3]
    assert json_fields["numeric_text"] == "12" and 'numeric_text="12"' in text_line
    assert json_fields["literal_text"] == "true" and 'literal_text="true"' in text_line


@pytest.mark.parametrize("value", [0.1, 1e-5, 12345678.9, -0.0, 2**53, math.pi])
def test_numbers_read_back_from_text_as_json_holds_them(value: float) -> None:
    assert _scalar(text_value(normalize(value))) == normalize(value)


def test_emit_refuses_reserved_and_malformed_names() -> None:
    log = logging.getLogger("quinkgl.test")
    log.setLevel(logging.INFO)
    with pytest.raises(ValueError):
        emit(log, logging.INFO, "round-end", round=3)
    with pytest.raises(ValueError):
        emit(log, logging.INFO, "Round End")
    with pytest.raises(ValueError):
        emit(log, logging.INFO, "round-end", **{"Bad-Key": 1})
