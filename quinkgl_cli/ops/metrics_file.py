"""The JSON-lines metrics file (`--metrics-file`): one object per completed round, appended as the run goes.

Each line: ``ts`` (UTC, ISO 8601), ``node``, ``swarm``, ``round``, then that round's metrics as the daemon's
``round-end`` and ``on_round_end`` know them (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``peers``,
``bytes_sent``, ...; NaN written as ``"nan"``). After the last round, the final consensus's line: ``"phase":
"final-consensus"``, the last round's number, the evaluation after it and the traffic it moved, so the lines'
``bytes_sent`` add up to the ``finished`` line's. A restarted daemon appends to the same file from the round it
resumes at, so one file holds a whole run. Each line is one ``write`` on a file opened for appending, so a
killed daemon leaves at most its last line incomplete; `read_metrics` refuses anything else that is not a line
of this shape. A file removed during the run is made again at the next line (``output-reopened``); while its
directory is gone, ``output-lost`` says once that lines are lost (`quinkgl_cli.outputfile`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, UsageError
from quinkgl_cli.ops.snapshot import CONSENSUS_KEY, DaemonSnapshot, json_safe
from quinkgl_cli.outputfile import lost_line, names_open_file, reopened_line

FINAL_CONSENSUS = "final-consensus"  # the ``phase`` of the final consensus's line


class MetricsFile:
    """Appends a line for each round a snapshot shows completed since the first snapshot it saw."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._open_for_run = False  # from start to close
        self._lost = False  # the file was removed and could not be made again: said once
        self._written: int | None = None  # the last round on file; the first snapshot sets it
        self._consensus_written = False

    def start(self) -> None:
        try:
            self._fd = self._open()
        except OSError as exc:
            raise IOFailure(f"cannot open --metrics-file {self.path}: {exc.strerror}",
                            "check that its directory exists and is writable") from exc
        self._open_for_run = True

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _current(self) -> int | None:
        """The file to append to: made again when its path no longer names the open one (`quinkgl_cli.outputfile`);
        None while it cannot be (said once)."""
        if self._fd is not None and names_open_file(self.path, self._fd):
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._fd = self._open()
        except OSError as exc:
            if not self._lost:
                self._lost = True
                lost_line("--metrics-file", self.path, exc.strerror)
            return None
        self._lost = False
        reopened_line("--metrics-file", self.path)
        return self._fd

    def update(self, snapshot: DaemonSnapshot) -> None:
        if self._written is None:
            # The state a daemon starts (or resumes) with: its last round is already on file, or was never run here.
            self._written = snapshot.round
            return
        if snapshot.round > self._written and snapshot.round_metrics:
            self._append(snapshot, snapshot.round_metrics, {})
            self._written = snapshot.round
        consensus = snapshot.round_metrics.get(CONSENSUS_KEY)
        if isinstance(consensus, dict) and not self._consensus_written:
            self._append(snapshot, consensus, {"phase": FINAL_CONSENSUS})
            self._consensus_written = True

    def _append(self, snapshot: DaemonSnapshot, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
        fd = self._current() if self._open_for_run else None
        if fd is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snapshot.updated_at))
        record = {"ts": stamp, "node": snapshot.node_id, "swarm": snapshot.swarm_id, "round": snapshot.round, **extra}
        for key, value in metrics.items():
            record.setdefault(key, value)
        line = json.dumps(json_safe(record), separators=(",", ":"), allow_nan=False) + "\n"
        data = memoryview(line.encode())
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            raise IOFailure(f"cannot append to --metrics-file {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        fd, self._fd, self._open_for_run = self._fd, None, False
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class MetricsRun:
    """One node's rows of a metrics file, in round order (a resumed run's repeated rounds: the later row wins), and
    its final consensuses' rows (one per run that reached its round target, by the round it followed)."""

    node: str
    swarm: str
    rows: list[dict[str, Any]]
    consensus: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(path: Path) -> list[MetricsRun]:
    """Every node's rows in ``path``. A bad line is a one-line UsageError naming it; a last line cut short by a
    killed writer is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise IOFailure(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a UTF-8 metrics file") from exc
    lines = text.split("\n")
    by_node: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    consensus: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise UsageError(f"{path}:{number} is not a JSON line", "is this a --metrics-file?") from exc
        if not isinstance(row, dict) or not isinstance(row.get("round"), int) or isinstance(row.get("round"), bool) \
                or not isinstance(row.get("node"), str) or not isinstance(row.get("swarm"), str):
            raise UsageError(f"{path}:{number} lacks node, swarm or an integer round", "is this a --metrics-file?")
        kept = consensus if row.get("phase") == FINAL_CONSENSUS else by_node
        kept.setdefault((row["node"], row["swarm"]), {})[row["round"]] = row
    if not by_node:
        raise UsageError(f"{path} holds no rounds yet")
    return [MetricsRun(node, swarm, [rows[r] for r in sorted(rows)],
                       [c for _, c in sorted(consensus.get((node, swarm), {}).items())])
            for (node, swarm), rows in by_node.items()]
