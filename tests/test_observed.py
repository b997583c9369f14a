"""The daemon's snapshot of itself (`node.observed`), from a stand-in node and transport."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from quinkgl_cli.node.observed import SnapshotMaker
from quinkgl_cli.ops.snapshot import Aggregation
from quinkgl_cli.transport.base import PeerInfo


class FakeNode:
    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.node_id, self.swarm_id, self.rounds = "peer-1", "sha256:" + "cd" * 32, 20
        self.history = history
        self.completed_round = history[-1]["round"] if history else 0
        self.recorder = SimpleNamespace(consensus=None)

    def totals(self) -> dict[str, int]:
        return {"peers_met": 2, "bytes_sent": 5000, "bytes_received": 4000}

    def finish_round(self, peers: list[str]) -> None:
        r = self.completed_round + 1
        self.history.append({"round": r, "peers": len(peers), "peer_ids": peers, "val_accuracy": 0.5 + r / 100,
                             "dp_epsilon_spent": 0.1 * r, "dp_delta": 1e-5})
        self.completed_round = r


def test_snapshot_tracks_rounds_peers_and_the_last_aggregation() -> None:
    clock = {"wall": 1000.0, "mono": 50.0}
    node = FakeNode([{"round": 1, "peers": 1, "peer_ids": ["peer-2"]}, {"round": 2, "peers": 0, "peer_ids": []}])
    transport = SimpleNamespace(peers=lambda: [PeerInfo("peer-3", "ab", ("127.0.0.1", 7003), 48.0),
                                               PeerInfo("peer-2", "cd", None, 49.5)])
    make = SnapshotMaker(node, transport, "digits", "127.0.0.1:7001", wall=lambda: clock["wall"],
                         monotonic=lambda: clock["mono"])
    start = make("running")  # resumed at round 2: round 1's aggregation, time unknown
    assert (start.round, start.rounds, start.last_aggregation) == (2, 20, Aggregation(1, ["peer-2"], None))
    assert [(p.node_id, p.address, p.seen_seconds_ago) for p in start.peers] == [
        ("peer-2", None, 0.5), ("peer-3", "127.0.0.1:7003", 2.0)]
    clock["wall"] = 1010.0
    node.finish_round(["peer-2", "peer-3"])
    s = make("running")
    assert s.last_aggregation == Aggregation(3, ["peer-2", "peer-3"], 1010.0)
    assert (s.round, s.val_accuracy, s.bytes_sent, s.updated_at) == (3, 0.53, 5000, 1010.0)
    assert s.dp_epsilon_spent == pytest.approx(0.3) and s.round_metrics["dp_delta"] == 1e-5
    clock["wall"] = 1020.0
    node.finish_round([])  # a round alone keeps the earlier aggregation
    s = make("stopping")
    assert s.last_aggregation == Aggregation(3, ["peer-2", "peer-3"], 1010.0) and s.state == "stopping"
    assert s.round_metrics["round"] == 4 and s.started_at == 1000.0
