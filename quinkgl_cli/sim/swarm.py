"""Building a simulated swarm: the peers' share of one dataset, one real `Node` per peer (wired by
`quinkgl_cli.node.wiring.build_node`, as the daemon's), joined to the in-memory network one at a time.

The training set behind the script's training loader is split among the peers by label
(`quinkgl_cli.sim.partition`); the validation loader is shared by all peers so their accuracies compare. With the
partition ``script`` each peer instead gets what ``build_loaders(shard=i, num_shards=N, ...)`` returns, trains and
validates on exactly that, as a daemon started with those script arguments would. Every peer starts from the same
weights, as daemons of one swarm do. Simulator
modes get what they need injected at build: the FedAvg server (`ServerMean`, the whole training set's weight) and
clients (`AdoptGlobal`, a fresh optimizer per participation), the pairwise graph's `SelectedTargets`, and the
attackers' ``tamper``, `Eavesdrop` aggregator or flipped training labels (`quinkgl_cli.sim.attacks`). Owns nothing
after `build` returns the `Swarm`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodeConfig, NodePolicies, build_aggregator, build_topology
from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.node.wiring import build_node
from quinkgl_cli.sim.attacks import DATA_ATTACKS, KNOWING_ATTACKS, SILENT, Eavesdrop, FlippedLabels, tamper_for
from quinkgl_cli.sim.baseline import SERVER_ID, AdoptGlobal, SelectedTargets, ServerMean
from quinkgl_cli.sim.config import SimConfig
from quinkgl_cli.sim.data import materialize, peer_loader
from quinkgl_cli.sim.partition import dataset_labels, parse_scheme, partition_indices
from quinkgl_cli.sim.results import rss_mb
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

SCRIPT_PARTITION = "script"  # each peer gets what the script's build_loaders(shard=i, num_shards=N) returns


def _loader_size(loader: Any) -> int:
    """Samples behind a training loader (0 when its dataset has no length)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return 0


def peer_ids(peers: int) -> list[str]:
    width = max(3, len(str(peers - 1)))
    return [f"peer-{i:0{width}d}" for i in range(peers)]


def attacker_indices(config: SimConfig, rng: random.Random) -> list[int]:
    """Which peers attack: the first draw of the run's random stream (``rng``)."""
    return sorted(rng.sample(range(config.peers), config.attackers)) if config.attackers else []


@dataclass
class Swarm:
    nodes: list[Node] = field(default_factory=list)
    server: Node | None = None  # fedavg mode
    edges: list[tuple[int, int]] = field(default_factory=list)  # pairwise mode: the graph's edges, as node indices
    attackers: list[str] = field(default_factory=list)


class SwarmBuilder:
    # The Ray backend's shards replace it with a transport that hands messages for other shards' peers to Ray.
    transport_class: type[MemoryTransport] = MemoryTransport

    def __init__(self, script: PeerScript, manifest: Manifest, swarm_id: str, config: SimConfig, rounds: int,
                 network: MemoryNetwork, clock: Any) -> None:
        self.script = script
        self.manifest = manifest
        self.swarm_id = swarm_id
        self.config = config
        self.rounds = rounds
        self.network = network
        self.clock = clock
        self.classes: int | None = None  # of the split's class labels (`split`); None: the script's split, or none

    def shared_data(self) -> tuple[Any, Any, int]:
        """(the script's training loader, its validation batches, its batch size)."""
        args = dict(self.config.script_args)
        train_loader, val_loader, _ = self.script.build_loaders(self.manifest, **args)
        dataset = getattr(train_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise NodeConfigError(
                f"the training loader of {self.script.path.name} has no map-style dataset to split among peers",
                "return a torch DataLoader over a Dataset with __len__ and __getitem__ from build_loaders, or pass "
                f"--partition {SCRIPT_PARTITION} to give each peer the script's own build_loaders(shard=i, num_shards=N)",
            )
        batch_size = getattr(train_loader, "batch_size", None) or 32
        return train_loader, materialize(val_loader) if val_loader is not None else None, int(batch_size)

    def server_manifest(self) -> Manifest:
        """The FedAvg server's view: it broadcasts the global model as is (no DP noise, no compression), as the
        tutorial's server does; the clients' uploads keep the swarm's privacy and compression settings."""
        data = self.manifest.model_dump(mode="python")
        data["privacy"] = {**data["privacy"], "mode": "local_update", "dp_sgd": None, "dp_epsilon": None,
                           "dp_total_epsilon": None}
        data["compression"] = {}
        return Manifest.model_validate(data)

    def node(self, node_id: str, train: Any, val: Any, seed: int, manifest: Manifest | None = None,
              max_peers: int | None = None, seek: int | None = None, own: Any = None, **strategies: Any) -> Node:
        manifest = manifest or self.manifest
        # Every peer starts from the same weights, as daemons do (they seed model initialisation from the swarm id,
        # or --seed); then each peer's own stream, so that what it draws while training is its own.
        torch.manual_seed(self.config.seed)
        args = dict(self.config.script_args)
        model = self.script.build_model(manifest, **args)
        torch.manual_seed(seed)
        transport = self.transport_class(self.network, node_id, swarm_id=self.swarm_id, arch_hash=manifest.model.arch_hash,
                                    max_peers=max_peers or self.config.max_peers, seek=seek)
        # noise_seed: the simulator wants reproducible DP noise; a daemon never sets it (its noise must be secret).
        config = NodeConfig(node_id, rounds=self.rounds, seed=seed, noise_seed=seed)
        node = build_node(self.script, manifest, self.swarm_id, config, model, train, val, transport, clock=self.clock,
                          own_loader=own, **strategies)
        transport.start_sync(node)
        # Its introductions now, not all at the end: queued, every node's hellos and fingerprints would be held
        # at once (peers * view size of them), a peak the process keeps long after they are delivered.
        self.network.deliver_all()
        return node

    def script_shards(self) -> tuple[list[Any], list[Any], list[Any]]:
        """Per peer, the training loader and the materialized validation and own test batches of the script's own
        split (None where the script gives none)."""
        trains, vals, owns = [], [], []
        for i in range(self.config.peers):
            args = {**self.config.script_args, "shard": str(i), "num_shards": str(self.config.peers)}
            loaders = self.script.build_loaders(self.manifest, **args)
            trains.append(loaders.train)
            vals.append(materialize(loaders.val) if loaders.val is not None else None)
            owns.append(materialize(loaders.own) if loaders.own is not None else None)
        return trains, vals, owns

    def split(self) -> tuple[list[Any], list[Any], list[Any], Any, int]:
        """(training loader per peer, validation batches per peer, own test batches per peer (None: estimated from
        the validation set), the server's validation batches, training samples)."""
        cfg = self.config
        if cfg.partition == SCRIPT_PARTITION:
            trains, vals, owns = self.script_shards()
            return trains, vals, owns, vals[0], sum(_loader_size(t) for t in trains)
        script_loader, val_loader, batch_size = self.shared_data()
        dataset = script_loader.dataset
        scheme = parse_scheme(cfg.partition)
        labels, missing = self._class_labels(dataset)
        if labels is None:
            if scheme.kind != "iid":
                raise NodeConfigError(
                    f"--partition {cfg.partition} splits by class label, but {self.script.path.name}'s training data "
                    f"has none usable ({missing})", "use --partition iid for regression or unlabelled data",
                )
            labels = np.zeros(len(dataset), dtype=np.int64)  # one pseudo-class: iid becomes an even random split
        else:
            self.classes = int(labels.max()) + 1 if len(labels) else None
        parts = partition_indices(labels, cfg.peers, scheme, cfg.seed)
        trains = [peer_loader(dataset, idx, batch_size, torch.Generator().manual_seed(cfg.seed * 100_003 + i),
                              script_loader) for i, idx in enumerate(parts)]
        return trains, [val_loader] * cfg.peers, [None] * cfg.peers, val_loader, len(dataset)

    def _no_labels_to_flip(self) -> NodeConfigError:
        """Why ``labelflip`` has no class labels to flip, and what to do instead."""
        attack, others = f"--attackers N:{self.config.attack}", "signflip, gaussian, scale, alie or ipm"
        if self.manifest.task.type == "regression":
            return NodeConfigError(f"{attack} flips class labels, and a regression task has none",
                                   f"attack a regression task's shared models instead ({others}), or use labelflip "
                                   "on a classification task")
        if self.config.partition == SCRIPT_PARTITION:
            return NodeConfigError(f"{attack} flips class labels, and --partition {SCRIPT_PARTITION} does not read "
                                   "them (the script's own shards)",
                                   "use --partition iid, shards:K, classes:K or dirichlet:A")
        return NodeConfigError(f"{attack} flips class labels, and {self.script.path.name}'s training data has none "
                               "usable", f"make its dataset yield integer class labels, or attack its models ({others})")

    def _class_labels(self, dataset: Any) -> tuple[np.ndarray | None, str]:
        """The training set's class labels, or None and why it has none."""
        if self.manifest.task.type == "regression":
            # Several float targets per sample would read as one-hot rows and be split by their argmax.
            return None, "the manifest's task is regression"
        try:
            return dataset_labels(dataset), ""
        except (ValueError, TypeError, IndexError) as exc:
            return None, str(exc)

    def build(self, rng: random.Random, memory: dict[str, float]) -> Swarm:
        """Every node, joined to the network; ``rng`` draws the attackers (and goes on to drive the rounds);
        ``memory`` receives the build's memory figures."""
        cfg = self.config
        swarm = Swarm()
        trains, vals, owns, val_loader, total_samples = self.split()
        # One throwaway model and optimizer first: lazy imports (torch.optim pulls in much of torch) would
        # otherwise count as the first peer's memory.
        warm = self.script.build_model(self.manifest, **dict(cfg.script_args))
        self.script.build_optimizer(self.manifest, warm)
        del warm
        memory["rss_before_build_mb"] = rss_mb()
        ids = peer_ids(cfg.peers)
        if cfg.mode == "fedavg":
            swarm.server = self.server(val_loader, total_samples)
        attackers = attacker_indices(cfg, rng)
        swarm.attackers = [ids[i] for i in attackers]
        for i, (node_id, train, val, own) in enumerate(zip(ids, trains, vals, owns, strict=True)):
            swarm.nodes.append(self.peer(i, node_id, train, val, own, i in attackers))
        if cfg.mode == "pairwise":
            swarm.edges = graph_or_refuse(self.manifest, self.graph_edges(list(enumerate(swarm.nodes)), ids))
        memory["rss_after_build_mb"] = rss_mb()
        memory["per_peer_kb_build"] = (
            (memory["rss_after_build_mb"] - memory["rss_before_build_mb"]) * 1024.0 / cfg.peers
        )
        views = [len(n.known_peers) for n in swarm.nodes]
        memory.update(max_peers=float(cfg.max_peers) if cfg.mode != "fedavg" else 1.0,
                           known_peers_min=float(min(views)), known_peers_mean=sum(views) / len(views),
                           known_peers_max=float(max(views)))
        return swarm

    def server(self, val_loader: Any, total_samples: int) -> Node:
        """The FedAvg star's server, joined before every client: it takes every client, each client (allowed one
        peer) takes it. It holds only the validation set (it evaluates the global model there and never trains)."""
        cfg = self.config
        max_peers, seek = self.limits(SERVER_ID)
        return self.node(
            SERVER_ID, val_loader if val_loader is not None else [], val_loader, cfg.seed * 100_003 + cfg.peers,
            manifest=self.server_manifest(), max_peers=max_peers, seek=seek,
            aggregator=ServerMean(), topology=SelectedTargets(SERVER_ID),
            # The server trains on nothing; its broadcast carries the whole training set's weight (clients only
            # check that it is positive, and adopt it).
            policies=NodePolicies(reported_samples=total_samples),
        )

    def limits(self, node_id: str) -> tuple[int, int | None]:
        """(peer-table size, peers it seeks) of ``node_id``'s transport in this mode: a sharded run's ghosts join
        with the same, so that every shard draws the same introductions."""
        cfg = self.config
        if cfg.mode != "fedavg":
            return cfg.max_peers, None
        return (cfg.peers, cfg.peers) if node_id == SERVER_ID else (1, 1)

    def peer(self, i: int, node_id: str, train: Any, val: Any, own: Any, attacker: bool) -> Node:
        """Peer ``i`` of the swarm (not the FedAvg server), built and joined to the network."""
        cfg = self.config
        seed = cfg.seed * 100_003 + i
        strategies: dict[str, Any] = {}
        if cfg.mode == "fedavg":
            # A fresh local optimizer per participation, as FedAvg clients start from the global model anew.
            max_peers, seek = self.limits(node_id)
            strategies = {"aggregator": AdoptGlobal(SERVER_ID), "topology": SelectedTargets(node_id, [SERVER_ID]),
                          "max_peers": max_peers, "seek": seek, "policies": NodePolicies(fresh_optimizer=True)}
        elif cfg.mode == "pairwise":
            strategies = {"topology": SelectedTargets(node_id)}
        if attacker and cfg.attack in DATA_ATTACKS:
            if self.classes is None:
                raise self._no_labels_to_flip()
            train = FlippedLabels(train, self.classes)
        elif attacker and cfg.attack == SILENT:
            strategies["topology"] = SelectedTargets(node_id)  # no targets: it never sends
        elif attacker:
            heard = None
            if cfg.attack in KNOWING_ATTACKS:
                ids = peer_ids(cfg.peers)
                colluders = frozenset(ids[j] for j in attacker_indices(cfg, random.Random(cfg.seed)))
                heard = Eavesdrop(strategies.get("aggregator") or build_aggregator(self.manifest), colluders)
                strategies["aggregator"] = heard
            policies = strategies.get("policies", NodePolicies())
            tamper = tamper_for(cfg.attack, cfg.seed * 7919 + i, heard)
            strategies["policies"] = dataclasses.replace(policies, tamper=tamper)
        return self.node(node_id, train, val, seed, own=own, **strategies)

    def graph_edges(self, nodes: list[tuple[int, Node]], ids: list[str]) -> set[tuple[int, int]]:
        """The undirected edges the manifest's topology gives ``nodes`` (global index, node) over their known peers;
        ``ids``: every peer's id in the swarm's order. A sharded run unites its shards' edges."""
        index = {node_id: i for i, node_id in enumerate(ids)}
        edges: set[tuple[int, int]] = set()
        for i, node in nodes:
            topo = build_topology(self.manifest, node.node_id, random.Random(self.config.seed * 1_000_003 + i))
            for peer in topo.select(sorted(node.known_peers), 1):
                j = index[peer]
                edges.add((min(i, j), max(i, j)))
        return edges


def graph_or_refuse(manifest: Manifest, edges: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairwise graph's edges in order, or a one-line error when the topology gave none."""
    if not edges:
        raise NodeConfigError(f"{manifest.topology.name} gives the peers no edge to average over",
                              "use more peers or another topology")
    return sorted(edges)
