"""Log lines are a public interface: their shape in text and JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from quinkgl_cli.node.logs import setup_logging, split_message


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
    logging.getLogger("quinkgl.transport").warning("offer_refused peer=%s reason=%s", "p2", "oversized")
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
    assert m[1].group(3) == "7" and m[1].group(4) == "offer_refused peer=p2 reason=oversized"
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
    assert split_message("resumed from round 4 checkpoint=/x") == ("resumed from round 4", {"checkpoint": "/x"})
    assert split_message("x nan=nan") == ("x", {"nan": "nan"})
