"""A whole swarm in one process: N real `Node`s over the in-memory transport, in lockstep virtual time.

Every node is the daemon's own `quinkgl_cli.node.core.Node` (training, topology, encoding, validation,
aggregation); only the schedule differs. Instead of real intervals, the driver runs each step of a round for all
nodes, flushes the memory network (`MemoryNetwork.deliver_all`), and advances a virtual clock, so a run never
waits and is deterministic for a seed.

Modes:
- ``gossip``: the manifest's aggregation and topology, ``training.gossip_steps`` exchanges per training round and
  ``training.final_consensus_steps`` averaging-only exchanges after the last round (counted separately).
- ``fedavg``: the centralized baseline: one aggregator node samples ``clients_per_round`` clients each round, sends
  them the global model, they train and upload, it averages the uploads (`quinkgl_cli.sim.baseline`).
- ``pairwise``: the gossip of the DP tutorial (reference/gossip-dp-tutorial.txt): every peer trains, then
  ``pairs_per_round`` edges drawn uniformly with replacement from the manifest topology's graph are averaged one
  after another: both ends send their model to each other and aggregate with the manifest's rule (FedAvg: the
  pair's sample-weighted mean, its plain mean on equal shards). The graph is each node's topology choice over its
  known peers, made once at build (``RingTopology`` fanout 2: the ring). No consensus phase.
- ``local``: every peer trains alone (the lower reference).

Data: the simulator calls the script's ``build_loaders`` once, takes the dataset behind the training loader and
splits it among the peers by label (`quinkgl_cli.sim.partition`); the validation loader is shared by all peers so
their accuracies compare. With the partition ``script`` it calls ``build_loaders(shard=i, num_shards=N, ...)`` once
per peer instead and each peer trains and validates on exactly what its call returned, as a daemon started with
those script arguments would (the script's own split; its loaders are used as they are). Metrics are those of the
model each peer holds at the end of a round (after aggregation).

Peer views: each node knows at most ``max_peers`` peers (default: the daemon's IPv8 bound, 256), discovered as
`quinkgl_cli.transport.memory` describes (a joining node seeks half the bound), so a swarm of at most
``max_peers // 2 + 1`` peers is fully known to everyone and a larger one is a random graph in which every node knows
between ``max_peers // 2`` and ``max_peers`` others; memory grows with ``peers * max_peers``. Topologies choose among
a node's known peers: ``FullTopology`` sends to its whole view, ``RingTopology`` to the id-nearest peers of its view
(the swarm-wide ring only while views are complete). In ``fedavg`` mode the server knows every client and each
client only the server. Each node's introductions are delivered as it joins, so building never queues all of them.

Memory (``SimResult.memory``): resident set sizes of the process before building, after building and at the end,
the growth per peer over the build and over the whole simulation (``per_peer_kb``: everything the simulation took
from the system divided by the peers: freed memory is not always given back, so it is an upper bound, and
first-use costs weigh most on small swarms), the process's peak since it started, and the peer-view sizes.

Local DP (the manifest's ``privacy`` section) is each node's own sharing pipeline, as in the daemon; the simulator
only seeds its noise so that a run is reproducible. Peer-script hooks are not called (a hundred peers'
``on_round_end`` lines would bury the swarm's own report).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from quinkgl_cli.errors import NodeConfigError, UsageError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodeConfig, NodePolicies
from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.sim.attacks import tamper_for
from quinkgl_cli.sim.baseline import SERVER_ID, AdoptGlobal, SelectedTargets, ServerMean
from quinkgl_cli.sim.data import materialize, peer_loader
from quinkgl_cli.sim.partition import dataset_labels, parse_scheme, partition_indices
from quinkgl_cli.transport.memory import DEFAULT_MAX_PEERS, MemoryNetwork, MemoryTransport

log = logging.getLogger("quinkgl.sim")

Mode = Literal["gossip", "fedavg", "pairwise", "local"]
MODES: tuple[str, ...] = ("gossip", "fedavg", "pairwise", "local")
ROUND_SECONDS = 10.0  # virtual seconds a round takes (only timestamps see it)
SCRIPT_PARTITION = "script"  # each peer gets what the script's build_loaders(shard=i, num_shards=N) returns


@dataclass(frozen=True)
class Overrides:
    """Manifest settings replaced for a simulation (flags of `quinkgl simulate`); strings are typed by the schema."""

    aggregation: str | None = None
    aggregation_params: Mapping[str, str] = field(default_factory=dict)
    topology: str | None = None
    topology_params: Mapping[str, str] = field(default_factory=dict)
    fanout: int | None = None
    training_params: Mapping[str, str] = field(default_factory=dict)
    compression_params: Mapping[str, str] = field(default_factory=dict)
    dp_epsilon: float | None = None
    byzantine_f: int | None = None


@dataclass(frozen=True)
class SimConfig:
    peers: int = 20
    rounds: int = 20
    partition: str = "iid"
    seed: int = 0
    mode: Mode = "gossip"
    attackers: int = 0
    attack: str = "signflip"
    clients_per_round: int = 10  # fedavg mode
    pairs_per_round: int = 10  # pairwise mode
    max_peers: int = DEFAULT_MAX_PEERS  # each node's peer-view bound (gossip and local modes)
    threads: int = 1  # torch intra-op threads: peers run one after another, so tiny models do best on one
    script_args: Mapping[str, str] = field(default_factory=dict)
    overrides: Overrides = field(default_factory=Overrides)


@dataclass
class PeerRound:
    peer: str
    val_accuracy: float | None
    val_loss: float | None
    loss: float | None
    samples: int
    bytes_sent: int
    bytes_received: int
    updates_sent: int
    attacker: bool = False


@dataclass
class RoundSummary:
    round: int
    phase: str  # "train" | "consensus"
    mean_accuracy: float | None
    min_accuracy: float | None
    max_accuracy: float | None
    mean_val_loss: float | None
    bytes_sent: int
    model_sends: int
    seconds: float
    peers: list[PeerRound]


@dataclass
class SimResult:
    config: SimConfig
    manifest: Manifest
    swarm_id: str
    node_ids: list[str]
    attackers: list[str]
    rounds: list[RoundSummary]
    consensus: RoundSummary | None
    consensus_steps: int
    gossip_steps: int
    memory: dict[str, float]
    timing: dict[str, float]

    @property
    def final(self) -> RoundSummary:
        return self.consensus if self.consensus is not None else self.rounds[-1]


class VirtualClock:
    """The transport's and nodes' clock: moves only when the driver says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def apply_overrides(manifest: Manifest, ov: Overrides) -> Manifest:
    """A copy of ``manifest`` with ``ov`` applied, validated as a whole; bad values are usage errors.

    The copy is unsigned: it exists only inside this process and no peer ever checks it.
    """
    from quinkgl_cli.manifest.create import coerce_value
    from quinkgl_cli.strategies import registry

    data = manifest.model_dump(mode="python")
    data["signature"] = None
    for kind, name, params in (
        ("aggregation", ov.aggregation, ov.aggregation_params),
        ("topology", ov.topology, ov.topology_params),
    ):
        current = data[kind]
        entry = registry.resolve(kind, name or current["name"])  # type: ignore[arg-type]
        merged = dict(current["params"]) if entry.name == current["name"] else {}
        merged.update(params)
        if kind == "topology" and ov.fanout is not None:
            if "fanout" not in entry.params.model_fields:
                raise UsageError(f"--fanout does not apply to {entry.name}", "drop --fanout or pick another topology")
            merged["fanout"] = ov.fanout
        data[kind] = {"name": entry.name, "params": registry.validate_params(entry, merged)}
    for section, params in (("training", ov.training_params), ("compression", ov.compression_params)):
        if params:
            data[section] = {**data[section], **{k: coerce_value(v) for k, v in params.items()}}
    if ov.dp_epsilon is not None:
        data["privacy"] = {**data["privacy"], "dp_epsilon": ov.dp_epsilon}
    if ov.byzantine_f is not None:
        data["byzantine_f"] = ov.byzantine_f
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "manifest"
        raise UsageError(f"simulation setting {where}: {err['msg']}", "fix the override flag") from exc


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _loader_size(loader: Any) -> int:
    """Samples behind a training loader (0 when its dataset has no length)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return 0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Simulator:
    """Build once, `run()` once. ``progress`` is called after every round (and after the consensus phase)."""

    def __init__(
        self,
        script: PeerScript,
        manifest: Manifest,
        config: SimConfig,
        progress: Callable[[RoundSummary], None] | None = None,
    ) -> None:
        if config.peers < 1:
            raise UsageError(f"--peers {config.peers}: a swarm needs at least one peer", "use --peers 1 or more")
        if config.rounds < 1:
            raise UsageError(f"--rounds {config.rounds}: run at least one round", "use --rounds 1 or more")
        if config.mode not in MODES:
            raise UsageError(f"unknown mode {config.mode!r}", f"valid: {', '.join(MODES)}")
        if config.max_peers < 1:
            raise UsageError(f"--max-peers {config.max_peers}: a node must be able to know a peer", "use --max-peers 1 or more")
        if config.attackers > config.peers:
            raise UsageError(f"{config.attackers} attackers among {config.peers} peers", "use fewer attackers")
        if config.mode == "pairwise" and config.pairs_per_round < 1:
            raise UsageError(f"--pairs-per-round {config.pairs_per_round}: average at least one pair a round",
                             "use --pairs-per-round 1 or more")
        if config.mode == "fedavg" and not 1 <= config.clients_per_round <= config.peers:
            raise UsageError(
                f"--clients-per-round {config.clients_per_round} with {config.peers} peers", "use 1..peers clients per round"
            )
        if config.partition != SCRIPT_PARTITION:
            parse_scheme(config.partition)
        self.script = script
        self.config = config
        self.progress = progress
        self.manifest = apply_overrides(manifest, config.overrides)
        from quinkgl_cli.manifest.canonical import swarm_id

        self.swarm_id = swarm_id(self.manifest)
        # The manifest's round_limit is the swarm's maximum, here as in the daemon: --rounds may ask for fewer.
        limit = self.manifest.round_limit
        self.rounds = min(config.rounds, limit) if limit is not None else config.rounds
        self.clock = VirtualClock()
        self.network = MemoryNetwork(clock=self.clock, auto_deliver=False, seed=config.seed)
        self.nodes: list[Node] = []
        self.server: Node | None = None
        self.edges: list[tuple[int, int]] = []  # pairwise mode: the graph's edges, as indices into nodes
        self.attackers: list[str] = []
        self.memory: dict[str, float] = {}
        self.timing: dict[str, float] = {}
        self._rng = random.Random(config.seed)

    # ------------------------------------------------------------------------------------------ building
    def _shared_data(self) -> tuple[Any, Any, int]:
        args = dict(self.config.script_args)
        train_loader, val_loader = self.script.build_loaders(self.manifest, **args)
        dataset = getattr(train_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise NodeConfigError(
                f"the training loader of {self.script.path.name} has no map-style dataset to split among peers",
                "return a torch DataLoader over a Dataset with __len__ and __getitem__ from build_loaders",
            )
        batch_size = getattr(train_loader, "batch_size", None) or 32
        return dataset, materialize(val_loader) if val_loader is not None else None, int(batch_size)

    def _script_shards(self) -> tuple[list[Any], list[Any]]:
        """Per peer, the training loader and the materialized validation batches of the script's own split."""
        trains, vals = [], []
        for i in range(self.config.peers):
            args = {**self.config.script_args, "shard": str(i), "num_shards": str(self.config.peers)}
            train_loader, val_loader = self.script.build_loaders(self.manifest, **args)
            trains.append(train_loader)
            vals.append(materialize(val_loader) if val_loader is not None else None)
        return trains, vals

    def _server_manifest(self) -> Manifest:
        """The FedAvg server's view: it broadcasts the global model as is (no DP noise, no compression), as the
        tutorial's server does; the clients' uploads keep the swarm's privacy and compression settings."""
        data = self.manifest.model_dump(mode="python")
        data["privacy"] = {**data["privacy"], "dp_epsilon": None, "dp_total_epsilon": None}
        data["compression"] = {}
        return Manifest.model_validate(data)

    def _node(self, node_id: str, train: Any, val: Any, seed: int, manifest: Manifest | None = None,
              max_peers: int | None = None, seek: int | None = None, **strategies: Any) -> Node:
        manifest = manifest or self.manifest
        # Every peer starts from the same weights, as daemons do (they seed model initialisation from the swarm id,
        # or --seed); then each peer's own stream, so that what it draws while training is its own.
        torch.manual_seed(self.config.seed)
        args = dict(self.config.script_args)
        model = self.script.build_model(manifest, **args)
        optimizer = self.script.build_optimizer(manifest, model)
        torch.manual_seed(seed)
        transport = MemoryTransport(self.network, node_id, swarm_id=self.swarm_id, arch_hash=manifest.model.arch_hash,
                                    max_peers=max_peers or self.config.max_peers, seek=seek)
        node = Node(
            # noise_seed: the simulator wants reproducible DP noise; a daemon never sets it (its noise must be secret).
            NodeConfig(node_id, rounds=self.rounds, seed=seed, noise_seed=seed),
            manifest, self.swarm_id, model, train, val, optimizer, transport,
            hooks=None, clock=self.clock, **strategies,
        )
        transport.start_sync(node)
        # Its introductions now, not all at the end: queued, every node's hellos and fingerprints would be held
        # at once (peers * view size of them), a peak the process keeps long after they are delivered.
        self.network.deliver_all()
        return node

    def _split(self) -> tuple[list[Any], list[Any], Any, int]:
        """(training loader per peer, validation batches per peer, the server's validation batches, training samples)."""
        cfg = self.config
        if cfg.partition == SCRIPT_PARTITION:
            trains, vals = self._script_shards()
            return trains, vals, vals[0], sum(_loader_size(t) for t in trains)
        dataset, val_loader, batch_size = self._shared_data()
        scheme = parse_scheme(cfg.partition)
        try:
            labels = dataset_labels(dataset)
        except (ValueError, TypeError, IndexError) as exc:
            if scheme.kind != "iid":
                raise NodeConfigError(
                    f"--partition {cfg.partition} splits by class label, but {self.script.path.name}'s training data "
                    f"has none usable ({exc})", "use --partition iid for regression or unlabelled data",
                ) from exc
            labels = np.zeros(len(dataset), dtype=np.int64)  # one pseudo-class: iid becomes an even random split
        parts = partition_indices(labels, cfg.peers, scheme, cfg.seed)
        trains = [peer_loader(dataset, idx, batch_size, torch.Generator().manual_seed(cfg.seed * 100_003 + i))
                  for i, idx in enumerate(parts)]
        return trains, [val_loader] * cfg.peers, val_loader, len(dataset)

    def build(self) -> None:
        cfg = self.config
        started = time.perf_counter()
        trains, vals, val_loader, total_samples = self._split()
        # One throwaway model and optimizer first: lazy imports (torch.optim pulls in much of torch) would
        # otherwise count as the first peer's memory.
        warm = self.script.build_model(self.manifest, **dict(cfg.script_args))
        self.script.build_optimizer(self.manifest, warm)
        del warm
        self.memory["rss_before_build_mb"] = _rss_mb()
        width = max(3, len(str(cfg.peers - 1)))
        ids = [f"peer-{i:0{width}d}" for i in range(cfg.peers)]
        if cfg.mode == "fedavg":
            # The star: the server joins first and takes every client; each client, allowed one peer, takes it.
            # The server holds only the validation set (it evaluates the global model there and never trains).
            self.server = self._node(
                SERVER_ID, val_loader if val_loader is not None else [], val_loader, cfg.seed * 100_003 + cfg.peers,
                manifest=self._server_manifest(), max_peers=cfg.peers, seek=cfg.peers,
                aggregator=ServerMean(), topology=SelectedTargets(SERVER_ID),
                # The server trains on nothing; its broadcast carries the whole training set's weight (clients
                # only check that it is positive, and adopt it).
                policies=NodePolicies(reported_samples=total_samples),
            )
        attackers = sorted(self._rng.sample(range(cfg.peers), cfg.attackers)) if cfg.attackers else []
        self.attackers = [ids[i] for i in attackers]
        for i, (node_id, train, val) in enumerate(zip(ids, trains, vals, strict=True)):
            seed = cfg.seed * 100_003 + i
            strategies: dict[str, Any] = {}
            if cfg.mode == "fedavg":
                # A fresh local optimizer per participation, as FedAvg clients start from the global model anew.
                strategies = {"aggregator": AdoptGlobal(SERVER_ID), "topology": SelectedTargets(node_id, [SERVER_ID]),
                              "max_peers": 1, "seek": 1, "policies": NodePolicies(fresh_optimizer=True)}
            elif cfg.mode == "pairwise":
                strategies = {"topology": SelectedTargets(node_id)}
            if i in attackers:
                policies = strategies.get("policies", NodePolicies())
                strategies["policies"] = dataclasses.replace(policies, tamper=tamper_for(cfg.attack, cfg.seed * 7919 + i))
            self.nodes.append(self._node(node_id, train, val, seed, **strategies))
        if cfg.mode == "pairwise":
            self.edges = self._graph_edges()
        self.memory["rss_after_build_mb"] = _rss_mb()
        self.memory["per_peer_kb_build"] = (
            (self.memory["rss_after_build_mb"] - self.memory["rss_before_build_mb"]) * 1024.0 / cfg.peers
        )
        views = [len(n.known_peers) for n in self.nodes]
        self.memory.update(max_peers=float(cfg.max_peers) if cfg.mode != "fedavg" else 1.0,
                           known_peers_min=float(min(views)), known_peers_mean=sum(views) / len(views),
                           known_peers_max=float(max(views)))
        self.timing["build_s"] = time.perf_counter() - started

    def _graph_edges(self) -> list[tuple[int, int]]:
        """The undirected graph of the manifest's topology: each node's choice over its known peers, once."""
        from quinkgl_cli.node.core import build_topology

        index = {n.node_id: i for i, n in enumerate(self.nodes)}
        edges: set[tuple[int, int]] = set()
        for i, node in enumerate(self.nodes):
            topo = build_topology(self.manifest, node.node_id, random.Random(self.config.seed * 1_000_003 + i))
            for peer in topo.select(sorted(node.known_peers), 1):
                j = index[peer]
                edges.add((min(i, j), max(i, j)))
        if not edges:
            raise NodeConfigError(f"{self.manifest.topology.name} gives the peers no edge to average over",
                                  "use more peers or another topology")
        return sorted(edges)

    # ------------------------------------------------------------------------------------------ running
    def _exchange(self, nodes: list[Node], step: int) -> None:
        for node in nodes:
            node.share(step)
        self.network.deliver_all()
        for node in nodes:
            node.aggregate()

    def _gossip_round(self) -> None:
        for node in self.nodes:
            node.begin_round()
            node.train_round()
        for step in range(self.manifest.training.gossip_steps):
            self._exchange(self.nodes, step)

    def _pairwise_round(self) -> None:
        for node in self.nodes:
            node.begin_round()
            node.train_round()
        for step in range(self.config.pairs_per_round):
            a, b = (self.nodes[i] for i in self._rng.choice(self.edges))
            for sender, receiver in ((a, b), (b, a)):
                sender.share(step, to=[receiver.node_id])
            self.network.deliver_all()
            a.aggregate()
            b.aggregate()

    def _local_round(self) -> None:
        for node in self.nodes:
            node.begin_round()
            node.train_round()

    def _fedavg_round(self) -> None:
        assert self.server is not None
        server = self.server
        server.begin_round()
        for node in self.nodes:
            node.begin_round()
        sampled = sorted(self._rng.sample(range(len(self.nodes)), self.config.clients_per_round))
        chosen = [self.nodes[i] for i in sampled]
        server.share(0, to=[n.node_id for n in chosen])
        self.network.deliver_all()
        for node in chosen:
            node.aggregate()
            node.train_round()
            node.share(0)
        self.network.deliver_all()
        server.aggregate()

    def _summarize(self, round_idx: int, phase: str, started: float, reporting: list[Node],
                   metrics: dict[str, dict[str, Any]]) -> RoundSummary:
        attackers = set(self.attackers)
        peers: list[PeerRound] = []
        for node in reporting:
            m = metrics.get(node.node_id, {})
            peers.append(PeerRound(
                peer=node.node_id,
                val_accuracy=m.get("val_accuracy"),
                val_loss=m.get("val_loss"),
                loss=m.get("loss"),
                samples=int(m.get("samples") or node.sample_count),
                bytes_sent=int(m.get("bytes_sent", 0)),
                bytes_received=int(m.get("bytes_received", 0)),
                updates_sent=int(m.get("updates_sent", 0)),
                attacker=node.node_id in attackers,
            ))
        honest = [p for p in peers if not p.attacker]
        accs = [p.val_accuracy for p in honest if p.val_accuracy is not None]
        losses = [p.val_loss for p in honest if p.val_loss is not None]
        every = self.nodes + ([self.server] if self.server is not None else [])
        sent = sum(int(metrics.get(n.node_id, {}).get("bytes_sent", 0)) for n in every)
        sends = sum(int(metrics.get(n.node_id, {}).get("updates_sent", 0)) for n in every)
        return RoundSummary(
            round=round_idx, phase=phase,
            mean_accuracy=_mean(accs), min_accuracy=min(accs) if accs else None, max_accuracy=max(accs) if accs else None,
            mean_val_loss=_mean(losses), bytes_sent=sent, model_sends=sends,
            seconds=time.perf_counter() - started, peers=peers,
        )

    def _consensus(self) -> RoundSummary | None:
        steps = self.manifest.training.final_consensus_steps
        if self.config.mode != "gossip" or steps == 0:
            return None
        started = time.perf_counter()
        before = {n.node_id: (n.transport.stats.bytes_sent, n.transport.stats.bytes_received, n.transport.stats.models_sent)
                  for n in self.nodes}
        first_step = self.manifest.training.gossip_steps
        for s in range(steps):
            self._exchange(self.nodes, first_step + s)
        metrics: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            val_loss, val_acc = node.evaluate()
            st = node.transport.stats
            b = before[node.node_id]
            metrics[node.node_id] = {
                "val_loss": val_loss, "val_accuracy": val_acc, "samples": node.sample_count,
                "bytes_sent": st.bytes_sent - b[0], "bytes_received": st.bytes_received - b[1],
                "updates_sent": st.models_sent - b[2],
            }
        return self._summarize(self.rounds, "consensus", started, self.nodes, metrics)

    def run(self) -> SimResult:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> SimResult:
        if not self.nodes:
            self.build()
        cfg = self.config
        started = time.perf_counter()
        summaries: list[RoundSummary] = []
        step = {"gossip": self._gossip_round, "fedavg": self._fedavg_round, "pairwise": self._pairwise_round,
                "local": self._local_round}[cfg.mode]
        for r in range(1, self.rounds + 1):
            round_started = time.perf_counter()
            self.clock.advance(ROUND_SECONDS)
            step()
            metrics: dict[str, dict[str, Any]] = {}
            every = self.nodes + ([self.server] if self.server is not None else [])
            for node in every:
                if cfg.mode != "fedavg" or node is self.server:
                    node.evaluate()
                metrics[node.node_id] = node.end_round().as_dict()
            reporting = [self.server] if self.server is not None else self.nodes
            summary = self._summarize(r, "train", round_started, reporting, metrics)
            summaries.append(summary)
            log.info("sim-round round=%d mean_accuracy=%s min_accuracy=%s", r, summary.mean_accuracy, summary.min_accuracy)
            if self.progress is not None:
                self.progress(summary)
        consensus = self._consensus()
        if consensus is not None and self.progress is not None:
            self.progress(consensus)
        self.timing["run_s"] = time.perf_counter() - started
        self.timing["seconds_per_round"] = self.timing["run_s"] / self.rounds
        self.memory["rss_end_mb"] = _rss_mb()
        self.memory["per_peer_kb"] = (self.memory["rss_end_mb"] - self.memory["rss_before_build_mb"]) * 1024.0 / cfg.peers
        self.memory["process_peak_rss_mb"] = _peak_rss_mb()
        for node in self.nodes + ([self.server] if self.server is not None else []):
            node.transport.stop_sync()  # type: ignore[attr-defined]
        return SimResult(
            config=cfg, manifest=self.manifest, swarm_id=self.swarm_id,
            node_ids=[n.node_id for n in self.nodes], attackers=list(self.attackers),
            rounds=summaries, consensus=consensus,
            consensus_steps=self.manifest.training.final_consensus_steps if consensus is not None else 0,
            gossip_steps=self.manifest.training.gossip_steps if cfg.mode == "gossip" else 0,
            memory=dict(self.memory), timing=dict(self.timing),
        )


def simulate(script: PeerScript, manifest: Manifest, config: SimConfig,
             progress: Callable[[RoundSummary], None] | None = None) -> SimResult:
    """Build and run one simulation."""
    sim = Simulator(script, manifest, config, progress)
    return sim.run()

