"""The daemon's log lines: a public interface people `tee` and `grep`.

Text (default), one event per line, flushed at once::

    2026-11-23T18:30:01.123Z INFO peer-1 round=3 aggregated models peers=2 samples=300 from=[peer-2,peer-3] strategy=FedAvg
    2026-11-23T18:30:01.130Z INFO peer-1 round=3 round-end loss=0.4012 accuracy=0.88 val_loss=0.5011 ...
    2026-11-23T18:29:50.002Z INFO peer-1 round=0 peer-discovered peer=peer-2 address=127.0.0.1:7002 key=d37a7e4db10d33e3 known=1
    2026-11-23T18:29:49.871Z INFO peer-1 round=0 alone bootstrap=none hint="no peers found yet, training locally"

Fields: UTC time with milliseconds, level, node id, ``round=N`` (the round in progress, 0 before the first), then
the event and ``key=value`` fields. An event is one hyphenated word (``round-end``, ``checkpoint-saved``); the one
exception is ``aggregated models``, two words because the guide greps for exactly that. Values are written by the
one event encoder (`quinkgl_cli.events`: ``true``/``false``, ``-`` for none, ``[a,b]`` lists, JSON-quoted strings
where a bare word would be ambiguous). A traceback is folded into the same line (`` | `` between its lines) so one
event stays one line. A record logged by a library rather than through `events.emit` is the event ``log`` with
its text in ``message``.

Every line carries ``round=``, so the guide's ``grep 'round='`` shows them all; ``grep round-end`` gives exactly one
line per completed round with that round's numbers.

``--log-format json`` prints one JSON object per line with ``ts``, ``level``, ``node``, ``round``, ``logger``,
``event`` and every field as its own member, with the same values the text line shows (``null`` for ``-``).

Every ``quinkgl.*`` logger (node, transport, strategies) and the root logger go through here; ``ipv8``'s own loggers
are held at WARNING so routine packet noise stays out.

What the peer script prints to ``sys.stdout`` goes through here too (`ScriptOutput`), a line at a time: in text it
appears unchanged, in JSON it becomes a ``script-output`` event (``text`` member), so every stdout line of
``--log-format json`` is JSON. Whatever ``--log-level``, it is shown, as it always was.

Lines are written with one ``write`` each. When stdout is a pipe whose reader went away (``| tee`` killed), lines
are dropped instead of raising, with no traceback; once a reader is back (a named pipe reopened), the first line
written says how many were lost (``log-lines-dropped``). ``--log-file`` writes the same lines to a file as well,
rotated when it would pass ``--log-max-bytes`` (``--log-backups`` old copies: ``FILE.1`` newest).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from quinkgl_cli.errors import IOFailure
from quinkgl_cli.events import EVENT_ATTR, FIELDS_ATTR, EventMessage, Value, emit, text_fields
from quinkgl_cli.outputfile import lost_line, names_open_file, reopened_line

SCRIPT_OUTPUT = "script-output"
script_log = logging.getLogger("quinkgl.script")

@dataclass
class LogContext:
    """What a line needs beyond its record: the node id and the round in progress (the daemon keeps it current)."""

    node_id: str
    round: int = 0


def _timestamp(created: float) -> str:
    secs = int(created)
    millis = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def _one_line(text: str) -> str:
    return " | ".join(part for part in text.splitlines() if part.strip())


FOREIGN_EVENT = "log"


def event_of(record: logging.LogRecord) -> tuple[str, dict[str, Value]]:
    """The event and fields a record carries. Ours come from `events.emit`; a record logged some other way (a
    library's logger, a Python warning) is the event ``log`` with its text as the ``message`` field, so both
    renderings still show the same fields and nothing parses free text."""
    event = getattr(record, EVENT_ATTR, None)
    if event is not None:
        return event, getattr(record, FIELDS_ATTR)
    return FOREIGN_EVENT, {"message": _one_line(record.getMessage())}


class TextFormatter(logging.Formatter):
    def __init__(self, context: LogContext) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, EVENT_ATTR, None) == SCRIPT_OUTPUT:
            return str(getattr(record, FIELDS_ATTR)["text"])  # the script's own line, as it printed it
        node = getattr(record, "node", None) or self.context.node_id
        round_ = getattr(record, "round", None)
        if round_ is None:
            round_ = self.context.round
        event, fields = event_of(record)
        text = f"{event} {text_fields(fields)}" if fields else event
        if record.exc_info:
            text += " " + self.formatException(record.exc_info)
        return f"{_timestamp(record.created)} {record.levelname} {node} round={round_} {_one_line(text)}"


class JsonFormatter(TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", None) or self.context.node_id
        round_ = getattr(record, "round", None)
        if round_ is None:
            round_ = self.context.round
        obj: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "node": node,
            "round": round_,
            "logger": record.name,
        }
        obj["event"], fields = event_of(record)
        obj.update(fields)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


def _broken_pipe(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE


class FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record as one ``write`` call (line + newline) and flushes at once.

    Where the stream has a file descriptor, lines go straight to it (no buffer that a failed write would leave
    half-full). A write to a pipe nobody reads drops the line and counts it (`dropped`); the next line that gets
    through is preceded by a ``log-lines-dropped`` line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.dropped = 0
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
            self._fd = None
        if self._fd is not None:
            stream.flush()  # what was buffered before comes first

    def _write(self, text: str) -> bool:
        if self._fd is None:
            self.stream.write(text)
            self.stream.flush()
            return True
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            if not _broken_pipe(exc):
                raise
            return False
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with self.lock:  # type: ignore[union-attr]
                try:
                    if self.dropped and self._write(self._dropped_line(record)):
                        self.dropped = 0
                    if not self._write(line):
                        self.dropped += 1
                except BrokenPipeError:  # a stream without descriptor whose reader is gone
                    self.dropped += 1
        except Exception:
            self.handleError(record)

    def _dropped_line(self, record: logging.LogRecord) -> str:
        fields: dict[str, Value] = {"count": self.dropped, "reason": "broken_pipe"}
        note = logging.LogRecord("quinkgl.logs", logging.WARNING, record.pathname, record.lineno,
                                 "%s", (EventMessage("log-lines-dropped", dict(fields)),), None)
        note.__dict__.update({EVENT_ATTR: "log-lines-dropped", FIELDS_ATTR: fields})
        return self.format(note) + "\n"


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    """``--log-file``: the same lines in a file, rotated by size; made again when its path no longer names the open
    file, and while it cannot be, the lines are dropped after one ``output-lost`` WARNING (`quinkgl_cli.outputfile`)."""

    lost = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None and not names_open_file(self.baseFilename, self.stream.fileno()):
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
            reopen = True
        else:
            reopen = self.stream is None
        if reopen:
            try:
                self.stream = self._open()
            except OSError as exc:
                if not self.lost:
                    self.lost = True  # before the line: it comes back through this handler, which then drops it
                    lost_line("--log-file", self.baseFilename, exc.strerror)
                return
            self.lost = False
            reopened_line("--log-file", self.baseFilename)
        super().emit(record)


class ScriptOutput(io.TextIOBase):
    """Stands in for ``sys.stdout``: each line printed becomes a ``script-output`` record (see the module doc).

    A line is emitted once its newline arrives; an unfinished one at `close`. Output produced while that record
    is being handled (a handler that itself writes to ``sys.stdout``) goes to the real stream, never back here."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self._pending = ""
        self._lock = threading.RLock()
        self._busy = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "on", False):
            return self.target.write(text)
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for line in lines:
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        self._busy.on = True
        try:
            emit(script_log, logging.INFO, SCRIPT_OUTPUT, text=line)
        finally:
            self._busy.on = False

    def flush(self) -> None:
        pass  # each line is written as it completes

    def close(self) -> None:
        with self._lock:
            if self._pending:
                self._emit(self._pending)
                self._pending = ""
        super().close()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", None) or "utf-8"


def setup_logging(node_id: str, fmt: str = "text", level: int = logging.INFO, stream: TextIO | None = None,
                  log_file: Path | None = None, log_max_bytes: int = 10_000_000, log_backups: int = 5) -> LogContext:
    """Route every logger into one stdout handler (and ``log_file``) in the chosen format; returns the context the
    daemon updates. Without an explicit ``stream``, the script's ``print`` output is captured (`ScriptOutput`)."""
    if stream is None:
        current = sys.stdout
        out = current.target if isinstance(current, ScriptOutput) else current
        sys.stdout = ScriptOutput(out)
    else:
        out = stream
    context = LogContext(node_id)
    formatter = JsonFormatter(context) if fmt == "json" else TextFormatter(context)
    handlers: list[logging.Handler] = [FlushingHandler(out)]
    if log_file is not None:
        try:
            file_handler = RotatingLogFile(log_file, maxBytes=log_max_bytes, backupCount=log_backups, encoding="utf-8")
        except OSError as exc:
            raise IOFailure(f"cannot open --log-file {log_file}: {exc.strerror}",
                            "check that its directory exists and is writable") from exc
        handlers.append(file_handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, (FlushingHandler, RotatingLogFile)):  # a previous daemon's in this process; others stay
            root.removeHandler(old)
            if isinstance(old, RotatingLogFile):
                old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)  # present before IPv8 starts, so its logging.basicConfig adds nothing
    root.setLevel(logging.WARNING)
    logging.getLogger("quinkgl").setLevel(level)
    script_log.setLevel(logging.INFO)  # the script's prints show at any --log-level, as they always did
    logging.getLogger("ipv8").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return context
