"""Peer selection strategies: which known peers receive this node's model each round.

All of them are deterministic for a given ``rng`` and a given set of known peers (the order in which the node
lists peers does not matter: they are sorted first), and never select the node itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from quinkgl_cli.strategies import params as p
from quinkgl_cli.strategies.base import Topology

log = logging.getLogger("quinkgl.strategies")


def _candidates(peers: Sequence[str], self_id: str) -> list[str]:
    return sorted(set(peers) - {self_id})


class RandomTopology(Topology):
    """Uniform choice of ``fanout`` known peers per round (Ormandi et al.'s gossip learning)."""

    name = "RandomTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        pool = _candidates(peers, self.self_id)
        return self.rng.sample(pool, min(self.params.fanout, len(pool)))


class FullTopology(Topology):
    """Every known peer, every round (experiments; ignores fanout)."""

    name = "FullTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        return _candidates(peers, self.self_id)


class RingTopology(Topology):
    """Nodes sorted by id form a ring; send to the nearest ``fanout`` ring neighbours.

    Neighbours alternate successor, predecessor, second successor, ... so fanout 2 gives the undirected ring whose
    spectrum `strategies.spectral` reports (lambda_2 = 2 - 2 cos(2 pi / n)).
    """

    name = "RingTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        ring = sorted(set(peers) | {self.self_id})
        n = len(ring)
        if n <= 1:
            return []
        me = ring.index(self.self_id)
        chosen: list[str] = []
        step = 1
        while len(chosen) < min(self.params.fanout, n - 1):
            for offset in (step, -step):
                peer = ring[(me + offset) % n]
                if peer != self.self_id and peer not in chosen and len(chosen) < self.params.fanout:
                    chosen.append(peer)
            step += 1
        return chosen
