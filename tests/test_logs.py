"""Log lines are a public interface: their shape in text and JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from quinkgl_cli.node.logs import kv, setup_logging, split_message


@pytest.fixture(autouse=True)
def _drop_daemon_log_handlers() -> Iterator[None]:
    """setup_logging installs a root handler, as a daemon process should; tests must not leak it to later tests."""
    yield
    from quinkgl_cli.node.logs import FlushingHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, FlushingHandler):
            root.removeHandler(handler)


LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) (\S+) round=(\d+) (.*)$")


def test_text_lines_carry_time_level_node_round_and_fields() -> None:
    out = io.StringIO()
    ctx = setup_logging("peer-1", "text", stream=out)
    ctx.round = 7
    logging.getLogger("quinkgl.node").info("aggregated models peers=2 samples=300", extra={"round": 3})
    logging.getLogger("quinkgl.transport").warning("offer-refused peer=%s reason=%s", "p2", "oversized")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("quinkgl.daemon").exception("loop-died")
    logging.getLogger("quinkgl.node").debug("hidden at info level")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    m = [LINE.match(ln) for ln in lines]
    assert all(m)
    assert m[0].groups()[1:] == ("peer-1", "3", "aggregated models peers=2 samples=300")
    assert m[1].group(3) == "7" and m[1].group(4) == "offer-refused peer=p2 reason=oversized"
    assert "Traceback" in lines[2] and "ValueError: bad" in lines[2]


def test_json_lines_parse_fields() -> None:
    out = io.StringIO()
    setup_logging("peer-1", "json", stream=out)
    logging.getLogger("quinkgl.node").info("round-end loss=0.5000 val_accuracy=- note='two words' peers=2 flag=true",
                                           extra={"round": 4})
    obj = json.loads(out.getvalue())
    assert obj["event"] == "round-end" and obj["node"] == "peer-1" and obj["round"] == 4
    assert obj["loss"] == 0.5 and obj["val_accuracy"] is None and obj["note"] == "two words"
    assert obj["peers"] == 2 and obj["flag"] is True and obj["level"] == "INFO"


def test_split_message() -> None:
    assert split_message("resumed from_round=4 checkpoint=/x") == ("resumed", {"from_round": 4, "checkpoint": "/x"})
    assert split_message("aggregated models peers=2 from=a,b") == ("aggregated models", {"peers": 2, "from": "a,b"})
    assert split_message("x nan=nan") == ("x", {"nan": "nan"})
    # Quoted values are the strings they quote, whatever is inside; words after the fields belong to no field.
    assert split_message("""e a="it's" b="say \\"hi\\"" c='-' d=' x=1 ' tail""") == (
        "e", {"a": "it's", "b": 'say "hi"', "c": "-", "d": " x=1 "})
    assert split_message("e hint='unterminated x=1")[1] == {"hint": "'unterminated", "x": 1}


@pytest.mark.parametrize("value", ["two words", "it's", 'say "hi"', "both ' and \"", "", "-", "a=b c", "multi\nline"])
def test_kv_values_read_back_as_written(value: str) -> None:
    event, fields = split_message(f"e {kv(hint=value, n=3)}")
    assert event == "e" and fields == {"hint": value.replace("\n", " | ") if value != "-" else None, "n": 3}


def test_json_keeps_a_hint_with_spaces_and_punctuation() -> None:
    out = io.StringIO()
    setup_logging("peer-1", "json", stream=out)
    logging.getLogger("quinkgl.daemon").info("alone %s", kv(bootstrap="none", hint="no peers found yet, training "
                                                                            "locally; pass --bootstrap-peer HOST:PORT"))
    obj = json.loads(out.getvalue())
    assert obj["event"] == "alone" and obj["bootstrap"] == "none"
    assert obj["hint"] == "no peers found yet, training locally; pass --bootstrap-peer HOST:PORT"


_LOG_CALL = re.compile(r"""\blog\.(?:debug|info|warning|error|critical|exception)\(\s*(?:f?)(["'])(.*?)\1""", re.S)
_EVENT = re.compile(r"^[a-z]+(-[a-z]+)*$")


def test_node_and_simulator_lines_are_events_with_fields_as_data() -> None:
    """Every line the node, the daemon and the simulator log goes through `events.emit` (event name checked there,
    fields as data), never a message formatted by hand that the JSON mode would have to parse back."""
    from pathlib import Path

    import quinkgl_cli.node as node_pkg
    import quinkgl_cli.sim as sim_pkg

    emits = 0
    for package in (node_pkg, sim_pkg):
        for path in Path(package.__file__).parent.glob("*.py"):
            if path.name == "logs.py":  # the log set-up itself
                continue
            text = path.read_text()
            assert not _LOG_CALL.findall(text), path.name
            emits += text.count("emit(")
    assert emits >= 20  # the daemon's and the simulator's own; the node's parts log through NodeLog, which emits
