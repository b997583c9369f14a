"""Logs under operations: prints inside the JSON stream, a stdout pipe whose reader goes away, a rotated log file."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from quinkgl_cli.events import emit
from quinkgl_cli.node.logs import FlushingHandler, ScriptOutput, setup_logging

log = logging.getLogger("quinkgl.test")


def test_json_stream_stays_json_with_script_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    setup_logging("peer-1", "json", level=logging.WARNING)  # prints show whatever the level
    emit(log, logging.WARNING, "before", n=1)
    print("[aggregated] peers=2 samples=300")
    print("two", "lines\nin one print", flush=True)
    sys.stdout.write("no newline yet")
    emit(log, logging.WARNING, "after", n=2)
    assert isinstance(sys.stdout, ScriptOutput)
    sys.stdout.close()
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    texts = [o["text"] for o in objs if o["event"] == "script-output"]
    assert texts == ["[aggregated] peers=2 samples=300", "two lines", "in one print", "no newline yet"]
    assert [o["event"] for o in objs][:1] == ["before"] and objs[-2]["event"] == "after"
    assert all(o["node"] == "peer-1" and o["level"] == "INFO" for o in objs if o["event"] == "script-output")


def test_text_mode_passes_prints_through_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    setup_logging("peer-1", "text")
    print("round=003 val_accuracy=0.81 'quoted'")
    setup_logging("peer-1", "text")  # a second daemon in this process wraps the real stream, not the wrapper
    print("again")
    assert out.getvalue().splitlines() == ["round=003 val_accuracy=0.81 'quoted'", "again"]


def test_reader_of_stdout_pipe_goes_away_and_comes_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "stdout.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    stream = open(fifo, "w", encoding="utf-8")
    try:
        setup_logging("peer-1", "json", stream=stream)
        emit(log, logging.INFO, "first")
        assert json.loads(os.read(reader, 65536))["event"] == "first"
        os.close(reader)  # `tee` killed
        for i in range(3):
            emit(log, logging.INFO, "lost", i=i)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # `tee` restarted on the named pipe
        emit(log, logging.INFO, "back")
        lines = [json.loads(line) for line in os.read(reader, 65536).decode().splitlines()]
        assert [(o["event"], o.get("count")) for o in lines] == [("log-lines-dropped", 3), ("back", None)]
    finally:
        stream.close()
        os.close(reader)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err


def test_broken_pipe_without_descriptor_is_counted_not_raised() -> None:
    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    handler = FlushingHandler(Gone())
    handler.emit(logging.LogRecord("quinkgl.test", logging.INFO, __file__, 1, "x", None, None))
    assert handler.dropped == 1


def test_log_file_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "peer.log"
    setup_logging("peer-1", "json", stream=io.StringIO(), log_file=path, log_max_bytes=2000, log_backups=2)
    for i in range(200):
        emit(log, logging.INFO, "tick", i=i, pad="x" * 40)
    files = sorted(tmp_path.glob("peer.log*"))
    assert [f.name for f in files] == ["peer.log", "peer.log.1", "peer.log.2"]
    assert all(f.stat().st_size <= 2000 for f in files)
    last = [json.loads(line)["i"] for line in path.read_text().splitlines()]
    assert last[-1] == 199
    older = [json.loads(line)["i"] for line in (tmp_path / "peer.log.1").read_text().splitlines()]
    assert older[-1] + 1 == last[0]


def test_log_file_in_a_missing_directory_is_exit_2(tmp_path: Path) -> None:
    from quinkgl_cli.errors import IOFailure

    with pytest.raises(IOFailure, match="--log-file"):
        setup_logging("peer-1", "text", stream=io.StringIO(), log_file=tmp_path / "no" / "peer.log")


def test_a_log_file_removed_with_its_directory_warns_once_and_is_made_again(tmp_path: Path) -> None:
    """`rm -r` of the log's folder mid-run: the lines went into the removed file without a word."""
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "peer.log"
    out = io.StringIO()
    setup_logging("peer-1", "text", stream=out, log_file=path)
    emit(log, logging.INFO, "tick", i=1)
    path.unlink()
    folder.rmdir()
    emit(log, logging.INFO, "tick", i=2)
    emit(log, logging.INFO, "tick", i=3)
    lost = [line for line in out.getvalue().splitlines() if " output-lost " in line]
    assert len(lost) == 1 and f"flag=--log-file path={path} " in lost[0], out.getvalue()
    folder.mkdir()
    emit(log, logging.INFO, "tick", i=4)
    text = path.read_text()
    assert "output-reopened flag=--log-file" in text and "tick i=4" in text and "tick i=3" not in text, text
