"""The pieces that turn real nodes into a centralized-FedAvg baseline: one aggregator node and its clients.

Centralized FedAvg is a comparison point of the simulator, not a daemon feature. The server is a `Node` whose
aggregator averages only what clients uploaded (its own stale model takes no part, as in McMahan et al.); clients
are `Node`s whose aggregator adopts the server's model verbatim. Both use `SelectedTargets`, a topology with a
fixed list of recipients (a client's: the server); the server's driver names each round's sampled clients in
`Node.share`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from quinkgl_cli.manifest import strategy_params as p
from quinkgl_cli.strategies.aggregation import screen, weighted_mean
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, PeerUpdate, Topology

SERVER_ID = "server"


class ServerMean(Aggregator):
    """Sample-weighted mean of the clients' uploads, without the server's previous model."""

    name = "ServerMean"

    def __init__(self) -> None:
        super().__init__(p.NoParams())

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        uploads = [u for u in s.updates if not u.is_local]
        if not uploads:
            return AggregationResult(local.flat.clone(), used=[], rejected=s.rejected, note="no client upload")
        weights = torch.tensor([max(u.sample_count, 1) for u in uploads], dtype=torch.float64)
        return AggregationResult(weighted_mean(uploads, weights), used=[u.peer_id for u in uploads], rejected=s.rejected)


class AdoptGlobal(Aggregator):
    """A client replaces its model with the server's broadcast."""

    name = "AdoptGlobal"

    def __init__(self, server_id: str = SERVER_ID) -> None:
        super().__init__(p.NoParams())
        self.server_id = server_id

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        for u in others:
            if u.peer_id == self.server_id:
                return AggregationResult(u.flat.to(torch.float32).clone(), used=[u.peer_id])
        return AggregationResult(local.flat.clone(), used=[], rejected=[u.peer_id for u in others], note="no broadcast")


class SelectedTargets(Topology):
    """Sends to ``targets`` (only those known), unless the driver names the recipients of a send."""

    name = "SelectedTargets"

    def __init__(self, self_id: str, targets: Sequence[str] = ()) -> None:
        super().__init__(p.NoParams(), self_id, random.Random(0))
        self.targets = list(targets)

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        known = set(peers)
        return [t for t in self.targets if t in known and t != self.self_id]
