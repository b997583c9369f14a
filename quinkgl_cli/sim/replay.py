"""Replaying a trace recorded by real daemons (`quinkgl run --trace FILE`, format `quinkgl_cli.node.trace`) in the
field driver: each simulated peer trains, receives and comes and goes as one recorded daemon did.

The trace may hold several daemons (their files concatenated); the i-th distinct node id, in file order, plays
simulated peer i (with ``--partition script``, shard i), so ``--peers`` must equal the number of nodes. Times of all
sessions are put on one axis by their headers' ``started_at`` (the earliest is virtual time 0) plus each record's
``t``. What is replayed:

- training: a round's recorded ``train.seconds`` (the last session's, for a round run twice); a round the trace does
  not hold takes the node's median. So do the round's evaluation and end-of-round saving (``eval_seconds``,
  ``save_seconds``): the daemon's round loop waits for them before its next round, and a peer that runs its rounds
  back to back (a straggler) is slower by them than its training alone says (a tenth, measured on loopback);
- transfers: a model going to a peer takes the ``seconds`` of the recipient's ``receive`` of that sender's update of
  that round, and is lost when that fetch failed (``ok`` false); one the trace does not hold takes the recipient's
  median successful receive (0 when it has none); control messages arrive at once. Sizes are not rescaled: the
  simulated model is taken to be the recorded one;
- arrivals and departures: a node joins at its first session's ``node-start`` (fresh, or from its checkpoint when
  that start resumed a round); a session that ended other than ``finished`` is a departure, and the next session's
  start a return, from its checkpoint or, when it started at round 0, from scratch. The ``peer-arrival`` and
  ``peer-departure`` records (what one node saw of the others) follow from these and are not replayed apart.

Owns the reading of a trace into these per-peer schedules (`TraceReplay`) and their lookups.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from quinkgl_cli.errors import UsageError
from quinkgl_cli.node.trace import NodeStart, NodeStop, Train, Transfer, read_trace, sessions


@dataclass(frozen=True)
class Presence:
    """A node's time in the swarm: joins at ``start`` (from its checkpoint when ``resumed``), leaves at ``stop``
    (None: it stayed to its end)."""

    start: float
    resumed: bool
    stop: float | None


@dataclass
class NodeTrace:
    node: str
    train: dict[int, float] = field(default_factory=dict)  # round -> training seconds
    evaluate: dict[int, float] = field(default_factory=dict)  # round -> seconds of its evaluation
    save: dict[int, float] = field(default_factory=dict)  # round -> seconds of its end-of-round saving
    received: dict[tuple[str, int], tuple[float, bool]] = field(default_factory=dict)  # (sender, round) -> (s, ok)
    presence: list[Presence] = field(default_factory=list)

    @property
    def typical_train_seconds(self) -> float:
        return statistics.median(self.train.values()) if self.train else 0.0

    def train_seconds(self, round_: int) -> float:
        return self.train.get(round_, self.typical_train_seconds)

    def eval_seconds(self, round_: int) -> float:
        return _recorded(self.evaluate, round_)

    def save_seconds(self, round_: int) -> float:
        return _recorded(self.save, round_)

    def receive_seconds(self, sender: str, round_: int) -> float | None:
        """Seconds the update of ``sender`` for ``round_`` takes to reach this node; None: it is lost."""
        hit = self.received.get((sender, round_))
        if hit is not None:
            return hit[0] if hit[1] else None
        ok = [s for s, good in self.received.values() if good]
        return statistics.median(ok) if ok else 0.0


def _recorded(seconds: dict[int, float], round_: int) -> float:
    """``round_``'s recorded seconds, or the median of the node's rounds (0 with none)."""
    hit = seconds.get(round_)
    if hit is not None:
        return hit
    return statistics.median(seconds.values()) if seconds else 0.0


class TraceReplay:
    def __init__(self, path: Path) -> None:
        self.path = path
        records = read_trace(path)
        parts = sessions(records)
        zero = min(s.header.started_at for s in parts)
        self.nodes: list[NodeTrace] = []
        by_id: dict[str, NodeTrace] = {}
        for session in parts:
            h = session.header
            trace = by_id.get(h.node)
            if trace is None:
                trace = by_id[h.node] = NodeTrace(h.node)
                self.nodes.append(trace)
            offset = (h.started_at - zero).total_seconds()
            start: NodeStart | None = None
            stop: NodeStop | None = None
            for ev in session.events:
                if isinstance(ev, Train):
                    trace.train[ev.round] = ev.seconds
                    trace.evaluate[ev.round] = ev.eval_seconds
                    trace.save[ev.round] = ev.save_seconds
                elif isinstance(ev, Transfer) and ev.direction == "receive":
                    trace.received[(ev.peer, ev.round)] = (ev.seconds, ev.ok)
                elif isinstance(ev, NodeStart) and start is None:
                    start = ev
                elif isinstance(ev, NodeStop):
                    stop = ev
            if start is None:
                continue  # a session that never started its node (a failed start-up) took no part
            left = None if stop is None or stop.reason == "finished" else offset + stop.t
            trace.presence.append(Presence(offset + start.t, start.round > 0, left))
        self.index = {t.node: i for i, t in enumerate(self.nodes)}

    def check_peers(self, peers: int) -> None:
        if peers != len(self.nodes):
            raise UsageError(f"--trace {self.path} holds {len(self.nodes)} nodes, --peers is {peers}",
                             f"use --peers {len(self.nodes)}: the i-th node of the trace plays peer i")
        missing = [t.node for t in self.nodes if not t.presence]
        if missing:
            raise UsageError(f"--trace {self.path}: node {missing[0]} never started a round loop",
                             "record the trace again, or remove that node's sessions")

    def transfer_seconds(self, sender: int, recipient: int, round_: int) -> float | None:
        """Seconds a model of ``round_`` from peer ``sender`` takes to peer ``recipient``; None: lost."""
        return self.nodes[recipient].receive_seconds(self.nodes[sender].node, round_)
