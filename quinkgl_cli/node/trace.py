"""The trace file of `quinkgl run --trace FILE`: what one daemon's run looked like, for the simulator to replay.

Format (``quinkgl-trace``, version 1): UTF-8 JSON lines, one object per line, one line per event, appended and
flushed as the run goes. Every object has a ``kind``; unknown kinds and unknown fields are refused. Times ``t`` are
seconds (float, >= 0, to the microsecond) on the daemon's monotonic clock since its session's ``header``; sizes
are bytes.

``header``          ``version`` (1), ``swarm`` (sha256:...), ``node`` (node id), ``started_at`` (UTC, ISO 8601),
                    ``torch_threads`` (int, or null when torch chose). First line of every session: a restarted
                    daemon appends a new header to the same file, and each header restarts ``t`` at 0.
``node-start``      ``t``, ``round``: the node's round loop starts (after ``--min-peers`` was waited for), from
                    the last completed round ``round`` (0 fresh, N when resumed). A session without one trained
                    nothing (start-up failed or was stopped, or the run had finished before).
``node-stop``       ``t``, ``round`` (last completed round), ``reason`` (``finished``, ``signal``, ``expired``,
                    ``error``).
``train``           ``t`` (when the round's work ended), ``round``, ``seconds`` (wall time of the round's local
                    training), ``samples`` (training samples seen), ``eval_seconds`` (the evaluation of the served
                    model after the round's last exchange) and ``save_seconds`` (the end-of-round bookkeeping:
                    the checkpoint, what the status socket and metrics file get). The round loop waits for all
                    three, so a peer that starts its rounds back to back (a straggler) runs on their sum; the last
                    two are optional (0 when absent, as in traces written before they were recorded).
``transfer``        ``t`` (when it ended), ``direction`` (``send``: a peer fetched this node's update;
                    ``receive``: this node fetched a peer's), ``peer`` (node id), ``round`` (the update's round),
                    ``bytes`` (the update's encoded size), ``seconds`` (the exchange: from the connection to the last
                    byte; a receive that never connected: the connecting), ``path`` (how the bytes went: ``direct``,
                    ``reverse``, ``relay``, ``udp``, or ``memory`` in-process), ``ok`` (false: it failed part way, or never
                    connected).
``peer-arrival``    ``t``, ``peer``: a peer became known (its first hello, or its return after being lost).
``peer-departure``  ``t``, ``peer``: a known peer was lost (timed out or said goodbye).

A daemon writes only its own file (it refuses a file that holds another node's or swarm's trace); traces of several
daemons may be concatenated (``cat a.trace b.trace > swarm.trace``): each session keeps its header, and
``started_at`` lines them up in wall time.

`read_trace` validates a whole file and returns its records in order; a bad line is a one-line `UsageError` naming
``FILE:LINE``. A last line without its newline (a killed writer) is skipped, as in the metrics file. `sessions`
groups records under their headers. `encode_record` is the one way a record becomes a line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from quinkgl_cli.errors import IOFailure, UsageError

FORMAT: Literal["quinkgl-trace"] = "quinkgl-trace"
VERSION: Literal[1] = 1

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
PeerId = Annotated[str, Field(min_length=1, max_length=64)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Header(_Record):
    kind: Literal["header"] = "header"
    format: Literal["quinkgl-trace"] = FORMAT
    version: Literal[1] = VERSION
    swarm: str = Field(min_length=1)
    node: PeerId
    started_at: datetime = Field(strict=False)  # read back from its ISO 8601 text
    torch_threads: Annotated[int, Field(ge=1)] | None = None


class NodeStart(_Record):
    kind: Literal["node-start"] = "node-start"
    t: Seconds
    round: Count


class NodeStop(_Record):
    kind: Literal["node-stop"] = "node-stop"
    t: Seconds
    round: Count
    reason: Literal["finished", "signal", "expired", "error"]


class Train(_Record):
    kind: Literal["train"] = "train"
    t: Seconds
    round: Annotated[int, Field(ge=1)]
    seconds: Seconds
    samples: Count
    eval_seconds: Seconds = 0.0  # absent in traces written before these were recorded: read as 0
    save_seconds: Seconds = 0.0


class Transfer(_Record):
    kind: Literal["transfer"] = "transfer"
    t: Seconds
    direction: Literal["send", "receive"]
    peer: PeerId
    round: Count
    bytes: Count
    seconds: Seconds
    path: Literal["direct", "reverse", "relay", "udp", "memory"]
    ok: bool


class PeerArrival(_Record):
    kind: Literal["peer-arrival"] = "peer-arrival"
    t: Seconds
    peer: PeerId


class PeerDeparture(_Record):
    kind: Literal["peer-departure"] = "peer-departure"
    t: Seconds
    peer: PeerId


TraceRecord = Annotated[Header | NodeStart | NodeStop | Train | Transfer | PeerArrival | PeerDeparture,
                        Field(discriminator="kind")]
_RECORD: TypeAdapter[TraceRecord] = TypeAdapter(TraceRecord)


def encode_record(record: TraceRecord) -> str:
    """One line of the file, newline included."""
    return record.model_dump_json() + "\n"


def parse_line(line: str) -> TraceRecord:
    """One record from one line; ValueError (pydantic's ValidationError is one) on anything else."""
    return _RECORD.validate_json(line)


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def read_trace(path: Path) -> list[TraceRecord]:
    """Every record of the trace file at ``path``, in file order, each session starting with its ``Header``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise IOFailure(f"cannot read trace {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a UTF-8 trace file", "is this a `quinkgl run --trace` file?") from exc
    lines = text.split("\n")
    records: list[TraceRecord] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_line(line)
        except ValidationError as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise UsageError(f"{path}:{number}: not a trace record ({_reason(exc)})",
                             "is this a `quinkgl run --trace` file of this quinkgl version?") from exc
        if not records and not isinstance(record, Header):
            raise UsageError(f"{path}:{number}: a trace starts with a header record, not {record.kind!r}")
        records.append(record)
    if not records:
        raise UsageError(f"{path} holds no trace records")
    return records


@dataclass(frozen=True)
class Session:
    """One daemon session of a trace: its header and the events after it, in file order."""

    header: Header
    events: list[NodeStart | NodeStop | Train | Transfer | PeerArrival | PeerDeparture]


def sessions(records: list[TraceRecord]) -> list[Session]:
    """``records`` (as `read_trace` returns them: a header first) split at each header."""
    out: list[Session] = []
    for record in records:
        if isinstance(record, Header):
            out.append(Session(record, []))
        elif not out:
            raise ValueError("trace records must start with a header")
        else:
            out[-1].events.append(record)
    return out
