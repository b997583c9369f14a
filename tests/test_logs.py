"""Log lines are a public interface: their shape in text and JSON."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from quinkgl_cli.events import emit
from quinkgl_cli.node.logs import setup_logging

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) (\S+) round=(\d+) (.*)$")


def test_text_lines_carry_time_level_node_round_and_fields() -> None:
    out = io.StringIO()
    ctx = setup_logging("peer-1", "text", stream=out)
    ctx.round = 7
    emit(logging.getLogger("quinkgl.node"), logging.INFO, "aggregated models", context={"round": 3}, peers=2, samples=300)
    emit(logging.getLogger("quinkgl.transport"), logging.WARNING, "offer-refused", peer="p2", reason="oversized")
    try:
        raise ValueError("bad\nthing")
    except ValueError as exc:
        emit(logging.getLogger("quinkgl.daemon"), logging.ERROR, "loop-died", exc_info=exc)
    emit(logging.getLogger("quinkgl.node"), logging.DEBUG, "hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    m = [LINE.match(ln) for ln in lines]
    assert all(m)
    assert m[0].groups()[1:] == ("peer-1", "3", "aggregated models peers=2 samples=300")
    assert m[1].group(3) == "7" and m[1].group(4) == "offer-refused peer=p2 reason=oversized"
    assert "Traceback" in lines[2] and "ValueError: bad" in lines[2]


def test_json_lines_carry_fields_as_members() -> None:
    out = io.StringIO()
    setup_logging("peer-1", "json", stream=out)
    emit(logging.getLogger("quinkgl.node"), logging.INFO, "round-end", context={"round": 4}, loss=0.5,
         val_accuracy=None, note="two words", peers=2, flag=True)
    obj = json.loads(out.getvalue())
    assert obj["event"] == "round-end" and obj["node"] == "peer-1" and obj["round"] == 4
    assert obj["loss"] == 0.5 and obj["val_accuracy"] is None and obj["note"] == "two words"
    assert obj["peers"] == 2 and obj["flag"] is True and obj["level"] == "INFO"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_library_record_is_a_log_event_with_its_text(fmt: str) -> None:
    """Records not logged through emit (a library's, a Python warning) are never parsed as if they held fields."""
    out = io.StringIO()
    setup_logging("peer-1", fmt, stream=out)
    logging.getLogger("ipv8.community").warning("peer=%s looks odd x=1", "p9")
    line = out.getvalue().rstrip("\n")
    if fmt == "json":
        obj = json.loads(line)
        assert obj["event"] == "log" and obj["message"] == "peer=p9 looks odd x=1" and "peer" not in obj
        assert obj["logger"] == "ipv8.community"
    else:
        assert line.endswith(' log message="peer=p9 looks odd x=1"')


def test_json_keeps_a_hint_with_spaces_and_punctuation() -> None:
    out = io.StringIO()
    setup_logging("peer-1", "json", stream=out)
    emit(logging.getLogger("quinkgl.daemon"), logging.INFO, "alone", bootstrap="none",
         hint="no peers found yet, training locally; pass --bootstrap-peer HOST:PORT")
    obj = json.loads(out.getvalue())
    assert obj["event"] == "alone" and obj["bootstrap"] == "none"
    assert obj["hint"] == "no peers found yet, training locally; pass --bootstrap-peer HOST:PORT"


_LOG_CALL = re.compile(r"""\b(?:log|logger|_log|self\.log)\.(?:debug|info|warning|error|critical|exception|log)\(""")


def test_every_line_of_the_package_goes_through_the_event_encoder() -> None:
    """No module of quinkgl_cli logs a message formatted by hand: every line goes through `events.emit` (event name
    and field names checked there, fields as data), so text and JSON can never disagree."""
    from pathlib import Path

    import quinkgl_cli

    emits = 0
    for path in Path(quinkgl_cli.__file__).parent.rglob("*.py"):
        if path.name == "events.py":  # the encoder itself hands the record to logging
            continue
        text = path.read_text()
        assert not _LOG_CALL.findall(text), path
        emits += text.count("emit(")
    assert emits >= 60  # the check above saw the package, not an empty directory
