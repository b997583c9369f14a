"""What a running daemon publishes about itself: one immutable `DaemonSnapshot`, and the `Observer` that takes it.

A snapshot is plain data (JSON-ready through `to_json`); the status client reads one back with `from_json`, which
validates it, since it arrives over a socket.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from quinkgl_cli.errors import UsageError

STATES = ("waiting", "running", "finished", "stopping")


@dataclass(frozen=True)
class PeerView:
    """A peer the transport currently knows: who, where, and how long since it was last heard from."""

    node_id: str
    address: str | None
    seen_seconds_ago: float | None


@dataclass(frozen=True)
class Aggregation:
    """The last round whose model mixed in other peers' updates."""

    round: int
    peers: list[str]
    at: float | None  # unix time; None: before this process started (a resumed run's last aggregation)


CONSENSUS_KEY = "final_consensus"  # round_metrics' key for the final consensus's metrics


@dataclass(frozen=True)
class DaemonSnapshot:
    node_id: str
    swarm_id: str
    manifest: str
    pid: int
    state: str  # one of STATES
    listen: str
    started_at: float  # unix time
    updated_at: float  # unix time
    round: int  # completed rounds
    rounds: int | None  # the round target; None: until stopped
    peers: list[PeerView] = field(default_factory=list)
    last_aggregation: Aggregation | None = None
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    bytes_sent: int = 0  # model bytes over the whole run (earlier processes of a resumed run included)
    bytes_received: int = 0
    dp_epsilon_spent: float | None = None  # None: no differential privacy (its delta is in round_metrics)
    # The last completed round's full metrics; once the final consensus ran, its metrics too, under CONSENSUS_KEY.
    round_metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As strict JSON: a NaN or infinite number becomes the string ``"nan"``/``"inf"``/``"-inf"`` (as in
        the JSON log lines); `from_json` reads those back as floats."""
        return json_safe(asdict(self))


def metric_number(value: Any) -> float | None:
    """A round metric as a finite number; None for anything else (absent, a flag, NaN or infinity, which the
    snapshot and the metrics file carry as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_ADAPTER: TypeAdapter[DaemonSnapshot] | None = None


def from_json(data: Any) -> DaemonSnapshot:
    """A snapshot from its JSON form; anything else is a one-line UsageError."""
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(DaemonSnapshot)
    try:
        snapshot = _ADAPTER.validate_python(data, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "snapshot"
        raise UsageError(f"malformed daemon status: {where}: {first['msg']}") from exc
    if snapshot.state not in STATES:
        raise UsageError(f"malformed daemon status: state {snapshot.state!r} is not one of {', '.join(STATES)}")
    return snapshot


class Observer(Protocol):
    """The only thing the daemon calls: ``update`` with its state at start, after each round and when it ends,
    then ``close`` (releases sockets and files; called once, also after a failure)."""

    def update(self, snapshot: DaemonSnapshot) -> None: ...

    def close(self) -> None: ...
