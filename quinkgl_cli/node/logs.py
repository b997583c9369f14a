"""The daemon's log lines: a public interface people `tee` and `grep`.

Text (default), one event per line, flushed at once::

    2026-11-23T18:30:01.123Z INFO peer-1 round=3 aggregated models peers=2 samples=300 from=peer-2,peer-3 strategy=FedAvg
    2026-11-23T18:30:01.130Z INFO peer-1 round=3 round-end loss=0.4012 accuracy=0.8800 val_loss=0.5011 ...
    2026-11-23T18:29:50.002Z INFO peer-1 round=0 peer-discovered peer=peer-2 address=127.0.0.1:7002 known=1

Fields: UTC time with milliseconds, level, node id, ``round=N`` (the round in progress, 0 before the first), then
the event (one or more words) and ``key=value`` fields. Values with spaces are quoted. A traceback is folded into the
same line (`` | `` between its lines) so one event stays one line.

``--log-format json`` prints one JSON object per line with ``ts``, ``level``, ``node``, ``round``, ``logger``,
``event``, ``message`` and every ``key=value`` field as its own member (numbers as numbers).

Every ``quinkgl.*`` logger (node, transport, strategies) and the root logger go through here; ``ipv8``'s own loggers
are held at WARNING so routine packet noise stays out. Output of ``print`` in user hooks is not touched.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

_KV = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$", re.S)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


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


def split_message(message: str) -> tuple[str, dict[str, Any]]:
    """``'aggregated models peers=2 from=a,b'`` -> ``('aggregated models', {'peers': 2, 'from': 'a,b'})``."""
    try:
        tokens = shlex.split(message, posix=True)
    except ValueError:
        tokens = message.split()
    words: list[str] = []
    fields: dict[str, Any] = {}
    for tok in tokens:
        m = _KV.match(tok)
        if m:
            fields[m.group(1)] = _typed(m.group(2))
        elif not fields:
            words.append(tok)
    return " ".join(words), fields


def _typed(value: str) -> Any:
    if _NUMBER.match(value):
        number = float(value) if any(c in value for c in ".eE") else int(value)
        return number if math.isfinite(number) else value
    if value in ("-", "None"):
        return None
    if value in ("true", "True"):
        return True
    if value in ("false", "False"):
        return False
    return value


class TextFormatter(logging.Formatter):
    def __init__(self, context: LogContext) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", None) or self.context.node_id
        round_ = getattr(record, "round", None)
        if round_ is None:
            round_ = self.context.round
        text = record.getMessage()
        if record.exc_info:
            text += " " + self.formatException(record.exc_info)
        return f"{_timestamp(record.created)} {record.levelname} {node} round={round_} {_one_line(text)}"


class JsonFormatter(TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", None) or self.context.node_id
        round_ = getattr(record, "round", None)
        if round_ is None:
            round_ = self.context.round
        message = _one_line(record.getMessage())
        event, fields = split_message(message)
        obj: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "node": node,
            "round": round_,
            "logger": record.name,
            "event": event,
            "message": message,
        }
        for key, value in fields.items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), default=str)


class FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record as one ``write`` call (line + newline) and flushes at once."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with_lock = self.lock
            if with_lock is not None:
                with_lock.acquire()
            try:
                self.stream.write(line)
                self.stream.flush()
            finally:
                if with_lock is not None:
                    with_lock.release()
        except Exception:
            self.handleError(record)


def setup_logging(node_id: str, fmt: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> LogContext:
    """Route every logger into one stdout handler in the chosen format; returns the context the daemon updates."""
    out = stream or sys.stdout
    if out is sys.stdout and hasattr(sys.stdout, "reconfigure"):
        # Hook prints without flush=True must not lag behind our lines when stdout is a pipe (`| tee`).
        sys.stdout.reconfigure(line_buffering=True)
    context = LogContext(node_id)
    handler = FlushingHandler(out)
    handler.setFormatter(JsonFormatter(context) if fmt == "json" else TextFormatter(context))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, FlushingHandler):  # a previous daemon's in this process; others (embedders, pytest) stay
            root.removeHandler(old)
    root.addHandler(handler)  # present before IPv8 starts, so its logging.basicConfig adds nothing
    root.setLevel(logging.WARNING)
    logging.getLogger("quinkgl").setLevel(level)
    logging.getLogger("ipv8").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return context
