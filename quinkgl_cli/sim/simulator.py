"""A whole swarm in one process: N real `Node`s over the in-memory transport, in lockstep virtual time (under
field conditions, `make_simulator` gives the field driver instead, `quinkgl_cli.sim.field`).

Every node is the daemon's own `quinkgl_cli.node.core.Node` (training, topology, encoding, validation,
aggregation), wired by the same `quinkgl_cli.node.wiring.build_node` (the script's ``build_optimizer`` and
``loss_fn`` included; `quinkgl_cli.sim.swarm` builds the swarm); only the schedule differs. Instead of real intervals, the driver runs each step of a round for all
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
their accuracies compare. Metrics are those of the model each peer holds at the end of a round (after aggregation).

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

Owns the run: the virtual clock, the memory network, the built swarm, the random draws of the rounds (pairs,
sampled clients) and the timing and memory figures; configuration is `quinkgl_cli.sim.config`, summaries
`quinkgl_cli.sim.results`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from quinkgl_cli.errors import UsageError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, evaluate_merged
from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.sim.config import MODES, Mode, Overrides, SimConfig, apply_overrides
from quinkgl_cli.sim.heap import collector_paused, survivors_frozen
from quinkgl_cli.sim.partition import parse_scheme
from quinkgl_cli.sim.results import PeerRound, RoundSummary, SimResult, peak_rss_mb, rss_mb, summarize
from quinkgl_cli.sim.swarm import SCRIPT_PARTITION, SwarmBuilder
from quinkgl_cli.transport.memory import MemoryNetwork

log = logging.getLogger("quinkgl.sim")

# What `quinkgl simulate`, reports and benchmarks import from here.
__all__ = ["MODES", "Mode", "Overrides", "PeerRound", "RoundSummary", "SimConfig", "SimResult", "Simulator",
           "apply_overrides", "make_simulator", "simulate"]

ROUND_SECONDS = 10.0  # virtual seconds a round takes (only timestamps see it)


class VirtualClock:
    """The transport's and nodes' clock: moves only when the driver says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
        if config.mode == "fedavg" and self.manifest.personalization.enabled:
            raise UsageError(
                f"--mode fedavg cannot report personalization {self.manifest.personalization.mode}: only its server's "
                "global model is evaluated, and the personal models live on the clients",
                "use --mode gossip, pairwise or local, or --personalization none")
        from quinkgl_cli.manifest.canonical import swarm_id

        if self.manifest.compression.mode == "choco" and config.mode in ("fedavg", "pairwise"):
            raise UsageError(f"compression mode choco cannot run in --mode {config.mode}: its estimates need every"
                             " increment to reach the same neighbours each step", "use --mode gossip")
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

    def build(self) -> None:
        started = time.perf_counter()
        builder = SwarmBuilder(self.script, self.manifest, self.swarm_id, self.config, self.rounds, self.network,
                               self.clock)
        with collector_paused():
            swarm = builder.build(self._rng, self.memory)
        self.nodes, self.server, self.edges, self.attackers = swarm.nodes, swarm.server, swarm.edges, swarm.attackers
        self.timing["build_s"] = time.perf_counter() - started

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
        return summarize(round_idx, phase, started, reporting, self._every(), set(self.attackers), metrics)

    def _every(self) -> list[Node]:
        return self.nodes + ([self.server] if self.server is not None else [])

    def _consensus(self) -> RoundSummary | None:
        """The manifest's averaging-only exchanges after the last round (`Node.begin_consensus`), gossip mode only."""
        if self.config.mode != "gossip" or self.manifest.training.final_consensus_steps == 0:
            return None
        started = time.perf_counter()
        steps = [node.begin_consensus() for node in self.nodes][0]
        for step in steps:
            self._exchange(self.nodes, step)
        metrics: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            evaluate_merged(node)
            metrics[node.node_id] = node.end_consensus().as_dict()
        return self._summarize(self.rounds, "consensus", started, self.nodes, metrics)

    def run(self) -> SimResult:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            # NumPy's BLAS too (each node's spectral analysis, every ``spectral_every`` rounds): its default of a
            # thread per core made a 150-node eigendecomposition 30x slower on a shared 2-core machine.
            with threadpool_limits(limits=self.config.threads, user_api="blas"):
                if not self.nodes:
                    self.build()
                with survivors_frozen():
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
            for node in self._every():
                if cfg.mode != "fedavg" or node is self.server:
                    node.evaluate()
                metrics[node.node_id] = node.end_round().as_dict()
            reporting = [self.server] if self.server is not None else self.nodes
            summary = self._summarize(r, "train", round_started, reporting, metrics)
            summaries.append(summary)
            emit(log, logging.INFO, "sim-round", mean_accuracy=summary.mean_accuracy, min_accuracy=summary.min_accuracy,
                 context={"round": r})
            if self.progress is not None:
                self.progress(summary)
        consensus = self._consensus()
        if consensus is not None and self.progress is not None:
            self.progress(consensus)
        return self._result(summaries, consensus, started)

    def _result(self, summaries: list[RoundSummary], consensus: RoundSummary | None, started: float) -> SimResult:
        """The run's result once its rounds are summarized: timing and memory figures, every transport stopped."""
        cfg = self.config
        self.timing["run_s"] = time.perf_counter() - started
        self.timing["seconds_per_round"] = self.timing["run_s"] / self.rounds
        self.memory["rss_end_mb"] = rss_mb()
        self.memory["per_peer_kb"] = (self.memory["rss_end_mb"] - self.memory["rss_before_build_mb"]) * 1024.0 / cfg.peers
        self.memory["process_peak_rss_mb"] = peak_rss_mb()
        self.network.stop_all()
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
    """Build and run one simulation: in lockstep, or under ``config.conditions`` by the field driver."""
    return make_simulator(script, manifest, config, progress).run()


def make_simulator(script: PeerScript, manifest: Manifest, config: SimConfig,
                   progress: Callable[[RoundSummary], None] | None = None) -> Simulator:
    """The lockstep `Simulator`, or the field driver (`quinkgl_cli.sim.field`) when ``config.conditions`` is set."""
    if config.conditions is None:
        return Simulator(script, manifest, config, progress)
    from quinkgl_cli.sim.field import FieldSimulator  # it builds on this module

    return FieldSimulator(script, manifest, config, progress)

