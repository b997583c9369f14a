"""The node: one peer's round logic, independent of any network or clock, coordinating the parts that own its state.

Drivers (the asyncio daemon with real time, the simulator in lockstep virtual time) own the schedule and call
the synchronous steps of a round in order::

    ... a real-time driver may first wait up to node.pace_plan(interval) for lagging peers (bounded staleness) ...
    node.begin_round()
    node.train_round()              # CPU-heavy: the daemon runs it in a worker thread
    for step in range(node.gossip_steps):
        node.share(step)            # topology picks peers, encode once, transport.send_model (never blocks)
        ... let updates arrive ...  # until a deadline, or node.has_fresh_update_from_all()
        node.aggregate()            # decode + validate the inbox, aggregate, load the result
    node.evaluate()                 # the model this peer serves at the end of the round (`ServingModel`)
    metrics = node.end_round()      # RoundMetrics; calls on_round_end
    ... after the last round, node.final_consensus_steps averaging-only exchanges (share + aggregate) ...

The parts, along a round's data flow: the `Trainer` (model, loaders, optimizer, loss; the only code run off the
driver's thread), the `Exchange` (encode, who to send to, decode; sharing pipeline and topology), the `Inbox`
(newest update per sender, staleness drops, its lock), the `PeerClock` (peers' rounds, quorum catch-up, lag and
the pacing wait), the `GraphWatch` (the observed gossip graph's spectral numbers), the `ServingModel` (the model
this peer serves: evaluation, metrics, the final model), the `RoundRecorder` (metrics, history, run totals) and
`node.state` (node <-> checkpoint). The node itself owns the round counter, the peer
table (known and met peers) and the aggregator, and is the transport's event sink (`TransportEvents`).

Everything is logged through ``quinkgl.node`` (`NodeLog`) with the node id and round. User hooks never break the
node: an exception in one is logged with its traceback and the round goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node import state as node_state
from quinkgl_cli.node.exchange import Exchange, Tamper
from quinkgl_cli.node.gossipgraph import GraphWatch
from quinkgl_cli.node.inbox import Inbox
from quinkgl_cli.node.metrics import AggregationOutcome, RoundMetrics, RoundRecorder
from quinkgl_cli.node.nodelog import Hooks, NodeLog, NoHooks, one_line
from quinkgl_cli.node.ownfingerprint import own_fingerprint
from quinkgl_cli.node.peerclock import PacePlan, PeerClock
from quinkgl_cli.node.personal import Shared
from quinkgl_cli.node.serving import ServingModel
from quinkgl_cli.node.state import NodeState
from quinkgl_cli.node.trainer import EvalStats, LossFn, Trainer, TrainStats, log_training
from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.aggregation import (
    LABEL_ENTROPY_KEY,
    EntropyWeightedAvg,
    FedAvg,
    FedProx,
    StalenessWeightedFedAvg,
)
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, PeerUpdate, Topology
from quinkgl_cli.strategies.choco import ConsensusStep, default_step
from quinkgl_cli.strategies.fingerprint import MESSAGE_KIND as FINGERPRINT_KIND
from quinkgl_cli.strategies.momentum import SlowMomentum
from quinkgl_cli.strategies.sharing import ENCODING as COMPRESSED_ENCODING
from quinkgl_cli.tensors import all_finite, flatten, load_flat
from quinkgl_cli.transport.base import ModelReceived, OutgoingUpdate, PeerInfo, Transport

__all__ = ["AggregationOutcome", "Hooks", "NoHooks", "Node", "NodeConfig", "NodePolicies", "NodeState",
           "RoundMetrics", "TrainStats", "build_aggregator", "build_topology"]


@dataclass(frozen=True)
class NodeConfig:
    """Per-node settings that are not part of the swarm's manifest (flags of `quinkgl run`, simulator knobs)."""

    node_id: str
    rounds: int | None = None  # capped by the manifest's round_limit; neither set: run until stopped
    local_epochs: int | None = None  # overrides manifest.training.local_epochs
    local_steps: int | None = None  # overrides manifest.training.local_steps
    seed: int = 0
    max_update_bytes: int | None = None  # receive limit; default: the wire bound for this model
    noise_seed: int | None = None  # DP, fingerprint and QSGD noise seed: the simulator only; None draws from the OS
    spectral_every: int = 5  # analyze the observed gossip graph every N rounds (a `spectral` log line)
    spectral_window: int = 10  # ... over the exchanges of the last N rounds


@dataclass(frozen=True)
class NodePolicies:
    """What the simulator's modes change in a node, injected at build (a daemon uses the defaults).

    ``reported_samples``: the weight this node reports, whatever it trains on (the FedAvg server);
    ``fresh_optimizer``: clear the optimizer's state when an aggregation replaced the model (FedAvg clients);
    ``tamper``: the weights actually sent, from the honest ones (Byzantine attackers, `quinkgl_cli.sim.attacks`).
    """

    reported_samples: int | None = None
    fresh_optimizer: bool = False
    tamper: Tamper | None = None


DEFAULT_POLICIES = NodePolicies()
# Plain averaging rules get slow momentum on the aggregated change (`strategies.momentum`); rules with their own
# state of the average (FedAvgM, Scaffold), robust rules and CHOCO's consensus step are left as they are.
SLOW_MOMENTUM_RULES = (FedAvg, FedProx, StalenessWeightedFedAvg, EntropyWeightedAvg)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _untouched(result: AggregationResult, local: PeerUpdate, others: list[PeerUpdate]) -> bool:
    """Whether the poison guard refused nothing and combined every update as it arrived (a clipped one is a new
    object): only then does quasi-global momentum take the aggregation's movement for the swarm's direction
    (`node.moments`; momentum would carry an attacker's pull on through local training), and only then may the
    round serve the held model (`node.serving`: it would carry what the served mean leaves out)."""
    given = {id(u) for u in (local, *others)}
    return not result.rejected and all(id(u) in given for u in result.combined)


def build_aggregator(manifest: Manifest) -> Aggregator:
    entry = registry.resolve("aggregation", manifest.aggregation.name)
    params = registry.build_params(entry, dict(manifest.aggregation.params))
    rule: Aggregator = registry.load(entry)(params, byzantine_f=manifest.byzantine_f)
    if manifest.compression.mode == "choco":
        return ConsensusStep(rule, default_step(manifest.compression))
    if type(rule) in SLOW_MOMENTUM_RULES:
        return SlowMomentum(rule)
    return rule


def build_topology(manifest: Manifest, node_id: str, rng: random.Random) -> Topology:
    entry = registry.resolve("topology", manifest.topology.name)
    params = registry.build_params(entry, dict(manifest.topology.params))
    return registry.load(entry)(params, node_id, rng)  # type: ignore[no-any-return]


def serving_model(aggregator: Aggregator, shared: nn.Module) -> ServingModel:
    """The served model: it averages models, so only under averaging rules (robust ones serve the model they hold);
    a wrapper (CHOCO's consensus step, slow momentum) is seen through to the rule it wraps."""
    rule = aggregator.inner if isinstance(aggregator, ConsensusStep | SlowMomentum) else aggregator
    return ServingModel(shared, isinstance(rule, FedAvg), rule.params.max_weight_ratio if isinstance(rule, FedAvg) else 1.0)


class Node:
    """One peer. See the module docstring for the order in which drivers call the steps."""

    def __init__(self, config: NodeConfig, manifest: Manifest, swarm_id: str, model: nn.Module,
                 train_loader: Iterable[Any], val_loader: Iterable[Any] | None, optimizer: torch.optim.Optimizer,
                 transport: Transport, hooks: Hooks | None = None, clock: Callable[[], float] = time.monotonic,
                 loss_fn: LossFn | None = None, aggregator: Aggregator | None = None,
                 topology: Topology | None = None, policies: NodePolicies = DEFAULT_POLICIES,
                 personal: Shared | None = None, own_loader: Iterable[Any] | None = None,
                 scheduler: LRScheduler | None = None) -> None:
        self.node_id = config.node_id
        self.manifest = manifest
        self.swarm_id = swarm_id
        self.transport = transport
        self.clock = clock
        self.log = NodeLog(config.node_id, lambda: self.round, hooks)
        self.rng = random.Random(config.seed)
        self.aggregator = aggregator or build_aggregator(manifest)
        training = manifest.training
        # The manifest's round_limit is the swarm's maximum: --rounds may ask for fewer, never more.
        limits = [r for r in (config.rounds, manifest.round_limit) if r is not None]
        self.rounds = min(limits) if limits else None
        self.round = 0  # the round in progress (1-based); after end_round, the last completed one
        self.completed_round = 0
        self.known_peers: dict[str, PeerInfo] = {}
        self.trainer = Trainer(manifest, model, train_loader, val_loader, optimizer, loss_fn,
                               config.local_epochs or training.local_epochs, config.local_steps if config.local_steps
                               is not None else training.local_steps, policies.reported_samples,
                               policies.fresh_optimizer, personal, self.rounds, config.noise_seed, own_loader,
                               scheduler)
        shared = self.trainer.shared  # only this part of the model is sent, aggregated and served (`node.personal`)
        self.graph = GraphWatch(self.node_id, config.spectral_every, config.spectral_window, self.log)
        self.exchange = Exchange(self.node_id, manifest, shared, transport, self.aggregator,
                                 topology or build_topology(manifest, self.node_id, self.rng), self.graph, self.log,
                                 config.max_update_bytes, config.noise_seed, policies.tamper, self.trainer.sample_dp)
        self.inbox = Inbox(training.max_staleness, self.log)
        self.peer_clock = PeerClock(training.max_staleness, clock)
        self.recorder = RoundRecorder()
        self.serving = serving_model(self.aggregator, shared)
        self.fingerprint = own_fingerprint(manifest, train_loader, shared, self.trainer.loss_fn, config.noise_seed,
                                           self.log)
        self.exchange.label_entropy = self.fingerprint.label_entropy
        if self.fingerprint.body is not None:
            self.exchange.topology.observe_fingerprint(self.node_id, dict(self.fingerprint.body))

    # ----------------------------------------------------------------- what drivers and tests read
    model = property(lambda self: self.trainer.shared)  # the shared part (FedRep: the backbone)
    optimizer = property(lambda self: self.trainer.optimizer)
    train_loader = property(lambda self: self.trainer.train_loader)
    sample_count = property(lambda self: self.trainer.sample_count)
    topology = property(lambda self: self.exchange.topology)
    sharing = property(lambda self: self.exchange.sharing)
    specs = property(lambda self: self.exchange.specs)
    history = property(lambda self: self.recorder.history)
    gossip_steps = property(lambda self: self.manifest.training.gossip_steps)
    final_consensus_steps = property(lambda self: self.manifest.training.final_consensus_steps)
    max_staleness = property(lambda self: self.manifest.training.max_staleness)
    pace_lag = property(lambda self: self.peer_clock.pace_lag)
    label_entropy = property(lambda self: self.fingerprint.label_entropy)
    fingerprint_body = property(lambda self: self.fingerprint.body)

    # ----------------------------------------------------------------- transport events
    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.known_peers[peer.node_id] = peer
        if self.fingerprint.encoded is not None:
            # Also on rediscovery: a peer that restarted has forgotten what we told it.
            self.transport.send_message(peer.node_id, FINGERPRINT_KIND, self.fingerprint.encoded)
        if not self.recorder.meet(peer.node_id):
            return
        address = f"{peer.address[0]}:{peer.address[1]}" if peer.address else None
        self.log(logging.INFO, "peer-discovered", peer=peer.node_id, address=address, key=peer.public_key[-16:],
                 known=len(self.known_peers))
        self.log.hook("on_peer_discovered", peer.node_id)

    def on_peer_lost(self, peer: PeerInfo) -> None:
        if self.known_peers.pop(peer.node_id, None) is not None:
            self.log(logging.INFO, "peer-lost", peer=peer.node_id, known=len(self.known_peers))
        self.peer_clock.forget(peer.node_id)
        self.inbox.forget(peer.node_id)
        self.exchange.forget(peer.node_id)

    def on_model(self, update: ModelReceived) -> None:
        """Keep the newest update per sender; drop ones too old for the strategy or too large."""
        if update.sender == self.node_id:
            return
        self.log(logging.DEBUG, "update-received", peer=update.sender, update_round=update.round,
                 bytes=len(update.payload))
        self.peer_clock.note_arrival(update.sender, update.round, self.round)
        limit = self.exchange.max_update_bytes
        if self.exchange.sharing.is_compressed(update.payload):
            # Applied to the sender's reconstruction first, stale or not: a delta chain must not skip a link (the
            # next delta would be refused and a full-weights resync follow). The codec enforces the size limit.
            meta = self.exchange.receive_compressed(update, self.inbox.drop)
            if meta is None:
                return
            self.peer_clock.note_valid(update.sender, update.round, self.round)
            # Keep its meta (label entropy), not the bytes.
            update = dataclasses.replace(update, payload=b"", encoding=COMPRESSED_ENCODING, meta={**update.meta, **meta})
        elif len(update.payload) > limit:
            self.inbox.drop(update.sender, update.round, f"{len(update.payload)} bytes exceeds limit {limit}")
            return
        if self.inbox.too_old(update.round, self.round):
            self.inbox.drop_stale(update.sender, update.round)
            return
        copied = self.exchange.copy_refusal(update, self.round)
        self.inbox.put(update, refused=copied)
        self.serving.note_peers([], [update.sender] if copied else [])  # a copier's earlier model is not served

    def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        self.exchange.on_message(sender, kind, body)

    # ----------------------------------------------------------------- pacing (bounded staleness)
    def lagging_peers(self) -> dict[str, int]:
        """Known peers this node should wait for before its next round, with how many rounds they lag."""
        return self.peer_clock.lagging(self.known_peers, self.completed_round, self.round)

    def pace_plan(self, interval: float) -> PacePlan | None:
        """Whom to wait for before the next round and for how long (None: start at once); ``interval`` is the
        driver's round interval, the least a round of ours is taken to last."""
        return self.peer_clock.pace_plan(self.lagging_peers(), self.recorder.recent_durations(5), interval)

    def forget_lagging(self, timed_out: Collection[str] = ()) -> None:
        self.peer_clock.forget_lagging(timed_out, self.round)

    def pending_senders(self) -> set[str]:
        return self.inbox.senders()

    def has_fresh_update_from_all(self) -> bool:
        """True when every known peer has an update of this round (or newer) waiting: no reason to wait longer."""
        return self.inbox.fresh_from_all(self.known_peers, self.round)

    # ----------------------------------------------------------------- round steps
    def begin_round(self) -> int:
        """Start the next round, or catch up when a quorum of known peers is far ahead (`PeerClock.catch_up`)."""
        self.round = self.completed_round + 1
        jump = self.peer_clock.catch_up(self.round, self.known_peers, self.rounds)
        if jump is not None:
            self.log(logging.INFO, "caught-up", from_round=self.round, to_round=jump.to_round, peers=jump.peers,
                     quorum=jump.quorum)
            self.round = jump.to_round
            self.completed_round = jump.to_round - 1
        self.recorder.begin(self.clock())
        self.inbox.begin_round()
        self.log(logging.DEBUG, "round-start", known_peers=len(self.known_peers))
        return self.round

    def train_round(self) -> TrainStats:
        """Local training: ``local_epochs`` passes over the training data, at most ``local_steps`` optimizer steps."""
        stats = self.trainer.train(self.round, self.aggregator, self.exchange.sharing)
        log_training(self.log, stats, self.trainer.input_shape.expected)
        self.recorder.train = stats
        self.log(logging.DEBUG, "trained", loss=stats.loss, accuracy=stats.accuracy, steps=stats.steps,
                 seconds=stats.duration)
        return stats

    def served_model(self) -> nn.Module:
        """What this peer serves (and its final model holds): its personal part over `ServingModel`'s shared model."""
        return self.trainer.personal.personal_model(self.serving.model(self.round))

    def evaluate(self) -> tuple[float | None, float | None]:
        """(val_loss, val_accuracy) of the served model (`_evaluate_served`); (None, None) without validation data."""
        result = _evaluate_served(self)
        if result is None:
            return (None, None)
        self.recorder.eval = result
        return (result.val_loss, result.val_accuracy)

    def note_trained(self) -> None:
        """The trained model becomes our entry of the served mean, sent or not (a deserted peer serves what it trains)."""
        self.serving.note_own(self.round, int(self.trainer.sample_count))

    def share(self, step: int = 0, to: Iterable[str] | None = None) -> list[str]:
        """Send the current model to the peers the topology picks (or to the known ones among ``to``). Never blocks."""
        self.note_trained()
        return self.exchange.share(self.round, int(self.trainer.sample_count), list(self.known_peers), step,
                                   None if to is None else list(to))

    def encode_update(self, step: int = 0, targets: Iterable[str] = ()) -> OutgoingUpdate:
        return self.exchange.encode_update(self.round, int(self.trainer.sample_count), step, list(targets))

    def decode_update(self, msg: ModelReceived) -> PeerUpdate:
        return self.exchange.decode(msg)

    def aggregate(self) -> AggregationOutcome | None:
        """Aggregate what the inbox holds with the local model and load the result; None when nothing usable arrived."""
        others: list[PeerUpdate] = []
        pending = self.inbox.take_all()
        while pending:
            msg = pending.pop()  # each payload is released once decoded: peak memory stays ~one update's bytes
            if self.inbox.too_old(msg.round, self.round):
                self.inbox.drop_stale(msg.sender, msg.round)
                continue
            try:
                others.append(self.exchange.decode(msg))
            except Exception as exc:
                self.inbox.drop(msg.sender, msg.round, f"invalid: {one_line(exc)}")
                continue
            self.peer_clock.note_valid(msg.sender, msg.round, self.round)
        if not others:
            return None
        entropy = self.fingerprint.label_entropy
        local = PeerUpdate(self.node_id, self.round, flatten(self.model), max(int(self.trainer.sample_count), 1),
                           meta={LABEL_ENTROPY_KEY: entropy} if entropy is not None else {}, is_local=True)
        name = self.aggregator.name
        try:
            result = self.aggregator.aggregate(local, others, self.round)
            if result.flat.shape != local.flat.shape or not all_finite(result.flat):
                raise ValueError("aggregate is not a finite vector of the model's size")
            load_flat(self.model, result.flat)
        except Exception as exc:
            for u in others:
                self.inbox.drop(u.peer_id, u.round, f"aggregation failed: {one_line(exc)}")
            self.log(logging.ERROR, "aggregation-failed", strategy=name, error=one_line(exc))
            return None
        clean = _untouched(result, local, others)
        self.trainer.model_replaced(trusted=clean)
        used = [p for p in result.used if p != self.node_id]
        samples = int(local.sample_count) + sum(u.sample_count for u in others if u.peer_id in used)
        for pid in result.rejected:
            self.log(logging.WARNING, "update-rejected", peer=pid, strategy=name, note=result.note or None)
        try:  # collaboration history, graded by how close each update came to the result (AffinityTopology)
            self.exchange.topology.observe_aggregation(local, others, result)
        except Exception as exc:
            self.log(logging.ERROR, "topology-failed", error=one_line(exc))
        for u in others:
            if u.peer_id in used:
                self.graph.observe(u, self.known_peers, self.round)
        self.serving.note_peers([u for u in result.combined if u.peer_id in used], result.rejected, self.round, clean)
        self.recorder.aggregated(used, samples)
        fields: dict[str, Any] = {"peers": len(used), "samples": samples, "from": used, "strategy": name}
        if result.note:
            fields["note"] = result.note
        self.log(logging.INFO, "aggregated models", **fields)
        self.log.hook("on_aggregation_done", list(used), samples)
        return AggregationOutcome(peers=used, rejected=list(result.rejected), samples=samples, note=result.note)

    def end_round(self) -> RoundMetrics:
        """Close the round: metrics, history, ``on_round_end``."""
        metrics = self.recorder.finish(self.round, self.clock(), self.transport.stats, len(self.known_peers),
                                       self.inbox.dropped, int(self.trainer.sample_count),
                                       self.exchange.sharing.round_metrics(), self.graph.analyze(self.round))
        self.completed_round = self.round
        d = metrics.as_dict()
        self.recorder.history.append(d)
        self.log(logging.INFO, "round-end", loss=metrics.loss, accuracy=metrics.accuracy, val_loss=metrics.val_loss,
                 val_accuracy=metrics.val_accuracy, **metrics.personal_fields(), peers=metrics.peers, samples=metrics.samples,
                 bytes_sent=metrics.bytes_sent, bytes_received=metrics.bytes_received, seconds=metrics.duration,
                 **self.exchange.sharing.log_fields(metrics.sharing))
        self.log.hook("on_round_end", self.round, dict(d))
        return metrics

    def begin_consensus(self) -> range:
        """Start the final averaging-only exchanges: their gossip steps (the driver shares, aggregates, evaluates)."""
        self.recorder.begin(self.clock())
        self.inbox.begin_round()
        self.serving.merged()
        self.aggregator.begin_consensus()
        return range(self.gossip_steps, self.gossip_steps + self.final_consensus_steps)

    def end_consensus(self) -> RoundMetrics:
        """The consensus phase's metrics (the model held now, the traffic since the last round): not history."""
        return self.recorder.finish(self.round, self.clock(), self.transport.stats, len(self.known_peers),
                                    self.inbox.dropped, int(self.trainer.sample_count),
                                    self.exchange.sharing.round_metrics(), dict(self.graph.latest), consensus=True)

    def finished(self) -> bool:
        return self.rounds is not None and self.completed_round >= self.rounds

    def totals(self) -> dict[str, int]:
        """The whole run's peers met and traffic so far, including the processes before a restart."""
        return self.recorder.totals(self.transport.stats)

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> NodeState:
        """Everything a restarted node needs, as tensors + JSON (`quinkgl_cli.node.state`). CPU tensors are views of
        the live state (the daemon serializes them at once): serialize or clone them before the node trains again."""
        tensors, trainer_meta = self.trainer.state_dict()
        tensors.update(node_state.aggregator_tensors(self.aggregator))
        exchange_tensors, topology = self.exchange.state_dict()
        tensors.update(exchange_tensors)
        rng_tensors, rng = node_state.rng_state(self.rng)
        tensors.update(rng_tensors)
        serving_tensors, serving = self.serving.state_dict()
        tensors.update(serving_tensors)
        meta = {"node_id": self.node_id, "swarm_id": self.swarm_id, "round": self.completed_round,
                "sample_count": int(self.trainer.sample_count), **trainer_meta, "topology": topology,
                "rng": rng, "serving": serving, **self.recorder.state_dict()}
        return NodeState(tensors=tensors, meta=meta)

    def load_state_dict(self, state: NodeState) -> None:
        """Restore a node saved by `state_dict`; the model and optimizer must be the same shapes."""
        t, meta = state.tensors, state.meta
        self.trainer.load_state_dict(t, meta, int(meta.get("sample_count", 0)))
        node_state.load_aggregator(self.aggregator, t)
        self.exchange.load_state_dict(t, dict(meta.get("topology") or {}))
        node_state.load_rng_state(self.rng, t, meta.get("rng", {}))
        self.serving.load_state_dict(t, meta.get("serving"))
        self.completed_round = int(meta["round"])
        self.round = self.completed_round
        self.recorder.load_state_dict(meta)


def _evaluate_served(node: Node) -> EvalStats | None:
    """The served shared model's evaluation on the validation loader (the personal model's recorded too); a served
    mean with a non-finite validation loss gives way, for the round, to the model the node holds
    (`ServingModel.unusable`)."""
    served = node.serving.model(node.round)
    result = node.trainer.evaluate(served)
    if result is not None and served is not node.model and not _finite(result.val_loss):
        node.log(logging.WARNING, "served-model-unusable", loss=result.val_loss,
                 hint="the average of the peers' latest models gives a non-finite validation loss: this round "
                      "serves the model this node holds")
        node.serving.unusable(node.round)
        result = node.trainer.evaluate(node.model)
    return result


def evaluate_merged(node: Node) -> tuple[float | None, float | None]:
    """`Node.evaluate` after the final merge's exchanges (every driver's last evaluation); FedRep's head first trains
    on the merged backbone (`Trainer.fit_head`), so that the head the peer keeps and serves fits it."""
    bad = node.trainer.fit_head()
    if bad is not None:
        node.log(logging.WARNING, "head-fit-rolled-back", loss=bad,
                 hint="a non-finite loss training the head on the merged backbone: the head was kept as it was")
    return node.evaluate()
