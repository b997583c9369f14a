"""The sharded schedule: `quinkgl_cli.sim.simulator`'s lockstep rounds with the swarm split among shard workers
(`quinkgl_cli.sim.shardworker`), which an executor runs (Ray actors: `quinkgl_cli.sim.raybackend`).

Each step the local simulator runs for all nodes, every shard runs for its own, in the swarm's order; between
steps the driver settles the network: it hands each shard's batches to their shards, wave after wave, until no
delivery is left (`quinkgl_cli.sim.shard` says why this delivers as one process does). The driver only counts:
the batches go from worker to worker without being read here. Metrics come back as JSON and are summarized as
the local simulator summarizes them, so a seed gives the same `SimResult` curves.

Every mode: ``fedavg`` and ``pairwise`` draw their clients and pairs here, from the run's random stream as the local
simulator does (attackers first, then each round's draw), and the shards holding the drawn peers act on them; the
pairwise graph is the union of the edges each shard's peers choose. Owns the driver's loop only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from quinkgl_cli.errors import UsageError
from quinkgl_cli.events import emit
from quinkgl_cli.sim.baseline import SERVER_ID
from quinkgl_cli.sim.config import SimConfig
from quinkgl_cli.sim.peerwarnings import replay
from quinkgl_cli.sim.results import RoundSummary, SimResult, peak_rss_mb, rss_mb, summarize
from quinkgl_cli.sim.simulator import ROUND_SECONDS, Simulator
from quinkgl_cli.sim.swarm import attacker_indices, graph_or_refuse, peer_ids

log = logging.getLogger("quinkgl.sim")
# The settings a shard worker is given (`shardworker.config_to_data`); any other must be at its default.
_SETTING_NAMES = {"conditions": "field conditions (--latency, --bandwidth, --drop, --churn, --late-join, --speed, "
                                 "--gossip-interval, --trace)"}
SHARDED_SETTINGS = ("peers", "rounds", "partition", "seed", "mode", "attackers", "attack", "clients_per_round",
                    "pairs_per_round", "max_peers", "threads", "script_args", "overrides")


class Executor(Protocol):
    """Runs `ShardWorker` calls: ``submit`` returns ``returns`` handles (values or futures) that may be passed on
    as arguments of later calls; ``get`` waits for handles' values."""

    shards: int

    def submit(self, shard: int, method: str, args: Sequence[Any], returns: int) -> list[Any]: ...

    def get(self, handles: list[Any]) -> list[Any]: ...

    def held_warnings(self) -> list[dict[str, Any]]:
        """The peer warnings the workers held back (`peerwarnings.PeerWarnings.export`); none where the workers
        log through this process's own handlers."""
        ...


@dataclass(frozen=True)
class PeerView:
    """What `summarize` reads of a node."""

    node_id: str
    sample_count: int


def check_mode(sim: Simulator, backend: str) -> None:
    """Refuse what the sharded schedule does not simulate: any setting added to `SimConfig` after it (field
    conditions, ...) unless left at its default."""
    default = SimConfig()
    unknown = [f.name for f in fields(SimConfig) if f.name not in SHARDED_SETTINGS
               and getattr(sim.config, f.name) != getattr(default, f.name)]
    if unknown:
        named = ", ".join(_SETTING_NAMES.get(name, name) for name in unknown)
        raise UsageError(f"the {backend} backend does not simulate {named} yet", "use --backend local")


def worker_args(sim: Simulator, shard: int, shards: int) -> list[Any]:
    """The `ShardWorker` constructor's arguments: plain data only."""
    from quinkgl_cli.sim.shardworker import config_to_data

    return [str(sim.script.path.resolve()), sim.manifest.model_dump(mode="json"), sim.swarm_id,
            config_to_data(sim.config, SHARDED_SETTINGS), sim.rounds, shard, shards]


class ShardedRun:
    def __init__(self, sim: Simulator, executor: Executor, backend: str,
                 progress: Callable[[RoundSummary], None] | None = None) -> None:
        check_mode(sim, backend)
        self.sim = sim
        self.ex = executor
        self.n = executor.shards
        self.progress = progress
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def _all(self, method: str, *args: Any) -> list[list[Any]]:
        return [self.ex.submit(i, method, args, self.n + 1) for i in range(self.n)]

    def _settle(self, outs: list[list[Any]]) -> None:
        """Waves until nothing is left to deliver: shard i gets every shard's batch for i."""
        while any(self.ex.get([out[0] for out in outs])):
            outs = [self.ex.submit(i, "wave", [out[1 + i] for out in outs], self.n + 1) for i in range(self.n)]

    def _metrics(self, method: str, *args: Any) -> tuple[list[PeerView], dict[str, dict[str, Any]]]:
        parts = self.ex.get([self.ex.submit(i, method, args, 1)[0] for i in range(self.n)])
        views: list[PeerView] = []
        metrics: dict[str, dict[str, Any]] = {}
        for part in parts:  # shards hold consecutive blocks: this is the swarm's order
            for node_id, (m, samples) in json.loads(part).items():
                views.append(PeerView(node_id, samples))
                metrics[node_id] = m
        return views, metrics

    # ------------------------------------------------------------------------------------------ the run
    def _exchanges(self, first: Callable[[int | None], list[list[Any]]], steps: Sequence[int]) -> None:
        """``first`` (a step that shares at ``steps[0]``, or at None), then share / settle / aggregate per step."""
        self._settle(first(steps[0] if steps else None))
        for k in range(len(steps)):
            self._settle(self._all("aggregate", steps[k + 1] if k + 1 < len(steps) else None))

    def run(self) -> SimResult:
        """The run; then, or when it fails, the peer warnings the workers held, logged here (`peerwarnings`)."""
        try:
            result = self._run()
        except Exception:
            # The run's error is the one to see; a worker that failed or died cannot answer, the others can.
            with contextlib.suppress(Exception):
                replay(self.ex.held_warnings())
            raise
        replay(self.ex.held_warnings())
        return result

    def _run(self) -> SimResult:
        sim, cfg = self.sim, self.sim.config
        rng = random.Random(cfg.seed)  # as the local simulator's: the attackers, then each round's draw
        ids = peer_ids(cfg.peers)
        attackers = set(ids[i] for i in attacker_indices(cfg, rng))
        started = time.perf_counter()
        self._settle(self._all("build"))
        edges = self._edges() if cfg.mode == "pairwise" else []
        self.timing["build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        steps = list(range(sim.manifest.training.gossip_steps)) if cfg.mode == "gossip" else []
        summaries: list[RoundSummary] = []
        now = 0.0
        for r in range(1, sim.rounds + 1):
            round_started = time.perf_counter()
            now += ROUND_SECONDS
            if cfg.mode == "fedavg":
                self._fedavg_round(now, rng, ids)
            elif cfg.mode == "pairwise":
                self._pairwise_round(now, rng, ids, edges)
            else:
                self._exchanges(lambda step: self._all("train", now, step), steps)  # noqa: B023 (called at once)
            views, metrics = self._metrics("finish_round", cfg.mode != "fedavg")
            # FedAvg: the server's global model is what the run reports; traffic counts every node.
            reporting = [v for v in views if v.node_id == SERVER_ID] if cfg.mode == "fedavg" else views
            summary = summarize(r, "train", round_started, reporting, views, attackers, metrics)
            summaries.append(summary)
            emit(log, logging.INFO, "sim-round", mean_accuracy=summary.mean_accuracy, min_accuracy=summary.min_accuracy,
                 context={"round": r})
            if self.progress is not None:
                self.progress(summary)
        consensus = self._consensus(attackers)
        if consensus is not None and self.progress is not None:
            self.progress(consensus)
        self.timing["run_s"] = time.perf_counter() - started
        self.timing["seconds_per_round"] = self.timing["run_s"] / sim.rounds
        memory = self._memory()
        return SimResult(
            config=cfg, manifest=sim.manifest, swarm_id=sim.swarm_id, node_ids=peer_ids(cfg.peers),
            attackers=sorted(attackers), rounds=summaries, consensus=consensus,
            consensus_steps=sim.manifest.training.final_consensus_steps if consensus is not None else 0,
            gossip_steps=sim.manifest.training.gossip_steps if cfg.mode == "gossip" else 0,
            memory=memory, timing=dict(self.timing),
        )

    def _edges(self) -> list[tuple[int, int]]:
        parts = self.ex.get([self.ex.submit(i, "edges", (), 1)[0] for i in range(self.n)])
        return graph_or_refuse(self.sim.manifest, {(int(a), int(b)) for part in parts for a, b in json.loads(part)})

    def _fedavg_round(self, now: float, rng: random.Random, ids: list[str]) -> None:
        """`Simulator._fedavg_round`: the server broadcasts to the sampled clients, which adopt, train, upload."""
        self._settle(self._all("begin_round", now))
        sampled = sorted(rng.sample(range(len(ids)), self.sim.config.clients_per_round))
        self._settle(self._all("broadcast", [ids[i] for i in sampled]))
        self._settle(self._all("participate", sampled))
        self._settle(self._all("server_aggregate"))

    def _pairwise_round(self, now: float, rng: random.Random, ids: list[str], edges: list[tuple[int, int]]) -> None:
        """`Simulator._pairwise_round`: every peer trains, then each drawn edge's two ends average."""
        self._settle(self._all("train", now, None))
        for step in range(self.sim.config.pairs_per_round):
            a, b = rng.choice(edges)
            self._settle(self._all("share_to", step, [[a, ids[b]], [b, ids[a]]]))
            self._settle(self._all("aggregate_only", [a, b]))

    def _consensus(self, attackers: set[str]) -> RoundSummary | None:
        training = self.sim.manifest.training
        if self.sim.config.mode != "gossip" or training.final_consensus_steps == 0:
            return None
        started = time.perf_counter()
        steps = list(range(training.gossip_steps, training.gossip_steps + training.final_consensus_steps))
        self._exchanges(lambda step: self._all("begin_consensus", step), steps)
        views, metrics = self._metrics("finish_consensus")
        return summarize(self.sim.rounds, "consensus", started, views, views, attackers, metrics)

    def _memory(self) -> dict[str, float]:
        """The shards' memory figures added up (each shard is a process), with the driver's own at the end."""
        parts = [json.loads(p) for p in self.ex.get([self.ex.submit(i, "resources", (), 1)[0] for i in range(self.n)])]
        total = {k: sum(float(p[k]) for p in parts) for k in ("rss_before_build_mb", "rss_after_build_mb", "rss_end_mb",
                                                              "process_peak_rss_mb")}
        peers = self.sim.config.peers
        views = [v for p in parts for v in p["known_peers"]]
        max_peers = 1 if self.sim.config.mode == "fedavg" else self.sim.config.max_peers  # as the local simulator
        return {**total, "shards": float(self.n), "driver_rss_mb": rss_mb(), "driver_peak_rss_mb": peak_rss_mb(),
                "per_peer_kb_build": (total["rss_after_build_mb"] - total["rss_before_build_mb"]) * 1024.0 / peers,
                "per_peer_kb": (total["rss_end_mb"] - total["rss_before_build_mb"]) * 1024.0 / peers,
                "max_peers": float(max_peers), "known_peers_min": float(min(views)),
                "known_peers_mean": sum(views) / len(views), "known_peers_max": float(max(views))}
