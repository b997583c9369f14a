"""What a running daemon tells its observer (`quinkgl_cli.ops`): the node's state now, as a `DaemonSnapshot`.

Owns the two facts the node does not keep: when this process's daemon started (wall clock) and when it last saw
a round that aggregated peers' updates (a resumed run's last one, found in its history, has no time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from quinkgl_cli.ops.snapshot import CONSENSUS_KEY, Aggregation, DaemonSnapshot, PeerView


class SnapshotMaker:
    def __init__(self, node: Any, transport: Any, manifest_name: str, listen: str,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.transport = transport
        self.manifest_name = manifest_name
        self.listen = listen
        self.wall = wall
        self.monotonic = monotonic
        self.started_at = wall()
        self.last_aggregation: Aggregation | None = None
        self._seen_round = -1

    def _note_aggregation(self, history: list[dict[str, Any]], now: float) -> None:
        if self._seen_round < 0:  # the first look: a resumed run's history, time unknown
            for row in reversed(history):
                if row.get("peers"):
                    self.last_aggregation = Aggregation(int(row["round"]), list(row.get("peer_ids") or []), None)
                    break
        elif history and history[-1].get("peers") and int(history[-1]["round"]) > self._seen_round:
            row = history[-1]
            self.last_aggregation = Aggregation(int(row["round"]), list(row.get("peer_ids") or []), now)
        self._seen_round = int(history[-1]["round"]) if history else 0

    def __call__(self, state: str) -> DaemonSnapshot:
        node = self.node
        now = self.wall()
        history = node.history
        self._note_aggregation(history, now)
        last = dict(history[-1]) if history else {}
        mono = self.monotonic()
        peers = [PeerView(p.node_id, f"{p.address[0]}:{p.address[1]}" if p.address else None,
                          round(max(mono - p.last_seen, 0.0), 3)) for p in self.transport.peers()]
        totals = node.totals()  # the whole run's, earlier processes of a resumed run included
        return DaemonSnapshot(
            node_id=node.node_id, swarm_id=node.swarm_id, manifest=self.manifest_name, pid=os.getpid(), state=state,
            listen=self.listen, started_at=self.started_at, updated_at=now, round=node.completed_round,
            rounds=node.rounds, peers=sorted(peers, key=lambda p: p.node_id), last_aggregation=self.last_aggregation,
            loss=last.get("loss"), accuracy=last.get("accuracy"), val_loss=last.get("val_loss"),
            val_accuracy=last.get("val_accuracy"), bytes_sent=totals["bytes_sent"],
            bytes_received=totals["bytes_received"], dp_epsilon_spent=last.get("dp_epsilon_spent"),
            round_metrics=last if node.recorder.consensus is None else {**last, CONSENSUS_KEY: node.recorder.consensus},
        )
