"""A shard worker: one block of a simulated swarm's peers, the real nodes built and driven in one process (a Ray
actor under `quinkgl_cli.sim.raybackend`), the rest of the swarm present as ghosts (`quinkgl_cli.sim.shard`).

The driver (`quinkgl_cli.sim.sharded`) calls the same steps as `quinkgl_cli.sim.simulator` does for all nodes,
each for this shard's nodes in the swarm's order, and moves what they send between shards. Everything in and out
is plain data or bytes (JSON metrics, `quinkgl_cli.sim.shardwire` batches): nothing of ours is pickled. Calls that
send return ``[count, batch for shard 0, batch for shard 1, ...]`` (``count``: deliveries still to make anywhere),
so that Ray can hand each batch to its shard without the driver reading it. Owns its nodes, network and clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, evaluate_merged
from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim import shardwire
from quinkgl_cli.sim.baseline import SERVER_ID
from quinkgl_cli.sim.config import Overrides, SimConfig
from quinkgl_cli.sim.results import peak_rss_mb, rss_mb
from quinkgl_cli.sim.shard import GhostTransport, ShardNetwork, ShardTransport, owners_of
from quinkgl_cli.sim.simulator import VirtualClock
from quinkgl_cli.sim.swarm import SwarmBuilder, attacker_indices, peer_ids

Out = list[Any]  # [count, bytes per shard]
# The FedAvg server's place in the delivery order: it joins, and sends, before every client (its shard: the first).
SERVER_INDEX = -1


def config_to_data(config: SimConfig, settings: Sequence[str]) -> dict[str, Any]:
    """``config``'s ``settings`` as plain data for a worker (`config_from_data` reads it back; the others keep
    their defaults)."""
    from dataclasses import asdict

    data = {k: v for k, v in asdict(config).items() if k in settings}
    data["script_args"] = dict(config.script_args)
    return data


def config_from_data(data: dict[str, Any]) -> SimConfig:
    fields = dict(data)
    overrides = dict(fields.pop("overrides"))
    return SimConfig(**fields, overrides=Overrides(**overrides))


class ShardBuilder(SwarmBuilder):
    transport_class = ShardTransport


class ShardWorker:
    """Shard ``shard`` of ``shards``; ``manifest`` is the simulation's (overrides applied), as JSON data."""

    def __init__(self, script: str, manifest: dict[str, Any], swarm_id: str, config: dict[str, Any], rounds: int,
                 shard: int, shards: int) -> None:
        self.config = config_from_data(config)
        torch.set_num_threads(self.config.threads)
        self.script = load_script(Path(script))
        self.manifest = Manifest.model_validate(manifest)
        self.shard, self.shards = shard, shards
        self.clock = VirtualClock()
        self.builder = ShardBuilder(self.script, self.manifest, swarm_id, self.config, rounds,
                                    ShardNetwork(shard, shards, {}, self.clock, self.config.seed), self.clock)
        self.network: ShardNetwork = self.builder.network  # type: ignore[assignment]
        self.ids = peer_ids(self.config.peers)
        self.network.owners.update(owners_of(self.ids, shards))
        self.network.owners[SERVER_ID] = 0
        self.nodes: list[tuple[int, Node]] = []  # (global index, node), in the swarm's order
        self._by_index: dict[int, Node] = {}
        self.server: Node | None = None  # fedavg mode, in the first shard
        self.memory: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ steps
    def build(self) -> Out:
        """Build this shard's nodes and join every peer in the swarm's order (the others as ghosts)."""
        cfg = self.config
        trains, vals, owns, server_val, total = self.builder.split()
        warm = self.script.build_model(self.manifest, **dict(cfg.script_args))  # imports, as `SwarmBuilder.build`
        self.script.build_optimizer(self.manifest, warm)
        del warm
        self.memory["rss_before_build_mb"] = rss_mb()
        if cfg.mode == "fedavg":
            self.network.begin(SERVER_INDEX)
            if self.shard == 0:
                self.server = self.builder.server(server_val, total)
            else:
                self._ghost(SERVER_ID)
        attackers = set(attacker_indices(cfg, random.Random(cfg.seed)))
        for i, node_id in enumerate(self.ids):
            self.network.begin(i)
            if self.network.owners[node_id] == self.shard:
                self.nodes.append((i, self.builder.peer(i, node_id, trains[i], vals[i], owns[i], i in attackers)))
                self._by_index[i] = self.nodes[-1][1]
            else:
                self._ghost(node_id)
            trains[i] = vals[i] = owns[i] = None  # another shard's data: let it go
        self.memory["rss_after_build_mb"] = rss_mb()
        return self._seal()

    def edges(self) -> bytes:
        """Pairwise mode: the graph's edges this shard's peers choose (`SwarmBuilder.graph_edges`), JSON."""
        return json.dumps(sorted(self.builder.graph_edges(self.nodes, self.ids))).encode()

    def train(self, now: float, share_step: int | None) -> Out:
        self.clock.now = now
        for _, node in self.nodes:
            node.begin_round()
            node.train_round()
        return self._share(share_step)

    def wave(self, *batches: bytes) -> Out:
        """Deliver one level: what other shards sent here for it, and this shard's own."""
        for data in batches:
            if data:
                self.network.ingest(shardwire.decode(data))
        self.network.deliver_all()
        return self._seal()

    def aggregate(self, share_step: int | None) -> Out:
        for _, node in self.nodes:
            node.aggregate()
        return self._share(share_step)

    def begin_round(self, now: float) -> Out:
        """FedAvg mode: every node (the server first) starts the round; only the sampled clients train."""
        self.clock.now = now
        if self.server is not None:
            self.server.begin_round()
        for _, node in self.nodes:
            node.begin_round()
        return self._share(None)

    def broadcast(self, clients: list[str]) -> Out:
        """FedAvg mode: the server sends the global model to the round's ``clients``."""
        if self.server is not None:
            self.network.begin(SERVER_INDEX)
            self.server.share(0, to=clients)
        return self._share(None)

    def participate(self, clients: list[int]) -> Out:
        """FedAvg mode: each sampled client of this shard adopts the broadcast, trains and uploads."""
        for i, node in self._own(clients):
            self.network.begin(i)
            node.aggregate()
            node.train_round()
            node.share(0)
        return self._share(None)

    def server_aggregate(self) -> Out:
        if self.server is not None:
            self.network.begin(SERVER_INDEX)
            self.server.aggregate()
        return self._share(None)

    def share_to(self, step: int, sends: list[list[Any]]) -> Out:
        """Pairwise mode: ``sends`` is ``[[global index, recipient id], ...]``; this shard's senders send."""
        for i, recipient in sends:
            if i in self._by_index:
                self.network.begin(i)
                self._by_index[i].share(step, to=[recipient])
        return self._share(None)

    def aggregate_only(self, indices: list[int]) -> Out:
        """Pairwise mode: the peers at ``indices`` (this shard's among them) aggregate what they received."""
        for i, node in self._own(indices):
            self.network.begin(i)
            node.aggregate()
        return self._share(None)

    def finish_round(self, evaluate: bool = True) -> bytes:
        """Evaluate (the peers when ``evaluate``; the FedAvg server always) and close the round; JSON ``{node id:
        [metrics, sample count]}``."""
        out = {}
        for _, node in self.nodes:
            if evaluate:
                node.evaluate()
            out[node.node_id] = [node.end_round().as_dict(), int(node.sample_count)]
        if self.server is not None:
            self.server.evaluate()
            out[SERVER_ID] = [self.server.end_round().as_dict(), int(self.server.sample_count)]
        return json.dumps(out).encode()

    def begin_consensus(self, share_step: int) -> Out:
        for _, node in self.nodes:
            node.begin_consensus()
        return self._share(share_step)

    def finish_consensus(self) -> bytes:
        out = {}
        for _, node in self.nodes:
            evaluate_merged(node)
            out[node.node_id] = [node.end_consensus().as_dict(), int(node.sample_count)]
        return json.dumps(out).encode()

    def resources(self) -> bytes:
        """This process's memory figures (JSON), and how many peers and known peers it holds."""
        views = [len(node.known_peers) for _, node in self.nodes]
        return json.dumps({**self.memory, "rss_end_mb": rss_mb(), "process_peak_rss_mb": peak_rss_mb(),
                           "peers": len(self.nodes), "known_peers": views}).encode()

    # ------------------------------------------------------------------------------------------ internals
    def _share(self, step: int | None) -> Out:
        if step is not None:
            for i, node in self.nodes:
                self.network.begin(i)
                node.share(step)
        return self._out(*self.network.take())

    def _own(self, indices: list[int]) -> list[tuple[int, Node]]:
        """This shard's peers among the global ``indices``, in the swarm's order (the local simulator's)."""
        return [(i, self._by_index[i]) for i in sorted(set(indices)) if i in self._by_index]

    def _ghost(self, node_id: str) -> None:
        """``node_id`` of another shard joins here as a ghost, with its transport's limits, and is introduced."""
        max_peers, seek = self.builder.limits(node_id)
        GhostTransport(self.network, node_id, swarm_id=self.builder.swarm_id, arch_hash=self.manifest.model.arch_hash,
                       max_peers=max_peers, seek=seek).join()
        self.network.deliver_all()

    def _seal(self) -> Out:
        return self._out(*self.network.seal())

    @staticmethod
    def _out(count: int, batches: list[shardwire.Batch]) -> Out:
        return [count, *(shardwire.encode(b) for b in batches)]
