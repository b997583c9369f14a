"""The node: one peer's round logic, independent of any network or clock.

Drivers (the asyncio daemon with real time, the simulator in lockstep virtual time) own the schedule and call
the synchronous steps of a round in order::

    ... a real-time driver may first wait a bounded time while node.lagging_peers() (bounded staleness) ...
    node.begin_round()
    node.train_round()              # CPU-heavy: the daemon runs it in a worker thread
    for step in range(node.gossip_steps):
        node.share(step)            # topology picks peers, encode once, transport.send_model (never blocks)
        ... let updates arrive ...  # until a deadline, or node.has_fresh_update_from_all()
        node.aggregate()            # decode + validate the inbox, aggregate, load the result
    node.evaluate()                 # the model this peer holds at the end of the round (after aggregation)
    metrics = node.end_round()      # RoundMetrics; calls on_round_end
    ... after the last round, node.final_consensus_steps averaging-only exchanges (share + aggregate) ...

The node is also the transport's event sink (`TransportEvents`): received updates land in an inbox that keeps the
newest update per sender; updates older than ``manifest.training.max_staleness`` rounds are dropped on arrival and
again when aggregating (a compressed one only after it has been applied to its sender's reconstruction). Event
callbacks may come from the event loop while `train_round` runs in a worker thread, so the inbox is guarded by a
lock; everything else happens on the driver's thread.

Everything is logged through ``logging.getLogger("quinkgl.node")`` as ``event key=value ...`` with the round in
``extra``; the daemon formats it (`quinkgl_cli.node.logs`). Every ``NodeConfig.spectral_every`` rounds ``end_round``
logs ``spectral window=W nodes=N edges=E lambda2=... gap=... mixing_bound=... connected=...`` about the gossip graph
this node has observed (its sends, the senders it aggregated and the recipients their updates name, ``gossip_to``);
the latest numbers are also in the round metrics as ``spectral_*``. User hooks never break the node: an exception
in one is logged with its traceback and the round goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from quinkgl_cli import wire
from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.aggregation import LABEL_ENTROPY_KEY
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate, Topology
from quinkgl_cli.strategies.fingerprint import MESSAGE_KIND as FINGERPRINT_KIND
from quinkgl_cli.strategies.fingerprint import fingerprint_for
from quinkgl_cli.strategies.sharing import ENCODING as COMPRESSED_ENCODING
from quinkgl_cli.strategies.sharing import RESYNC_KIND, SharingPipeline, StaleBase
from quinkgl_cli.strategies.spectral import GossipGraphMonitor
from quinkgl_cli.tensors import TensorSpec, all_finite, flatten, float_buffers, load_flat, shared_specs, trainable_mask
from quinkgl_cli.transport.base import ModelReceived, OutgoingUpdate, PeerInfo, Transport

log = logging.getLogger("quinkgl.node")

# Cap on a self-reported sample count before the aggregator's own bound (max_weight_ratio) applies: keeps
# arithmetic sane whatever a peer claims (the published package let one peer claim 2**32 samples).
MAX_REPORTED_SAMPLES = 1 << 31
EXTRA_PREFIX = "extra."
# Update meta naming the recipients of the send it rode on: how a peer learns its neighbours' gossip edges. Bounded
# so it always fits the transport's meta limit (4 KiB) next to the other keys.
GOSSIP_TO_KEY = "gossip_to"
MAX_GOSSIP_TO = 32
MAX_GOSSIP_TO_CHARS = 2048
PACE_MUTE_ROUNDS = 10  # a peer that did not catch up within a pacing wait is not waited for again this long


class Hooks(Protocol):
    """The optional user hooks the node calls (a `PeerScript` satisfies this; attributes may be None)."""

    on_round_end: Callable[[int, dict[str, Any]], Any] | None
    on_peer_discovered: Callable[[str], Any] | None
    on_aggregation_done: Callable[[list[str], int], Any] | None


@dataclass
class NoHooks:
    on_round_end: Callable[[int, dict[str, Any]], Any] | None = None
    on_peer_discovered: Callable[[str], Any] | None = None
    on_aggregation_done: Callable[[list[str], int], Any] | None = None


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


@dataclass
class TrainStats:
    loss: float | None
    accuracy: float | None
    samples: int  # training samples in one pass over the local data (the weight this peer reports)
    steps: int
    duration: float


@dataclass
class AggregationOutcome:
    peers: list[str]  # remote peers whose updates shaped the result
    rejected: list[str]
    samples: int  # local + used remote sample counts (as reported, before bounding)
    note: str = ""


@dataclass
class RoundMetrics:
    round: int
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    peers: int = 0  # distinct remote peers aggregated this round
    peer_ids: list[str] = field(default_factory=list)
    samples: int = 0  # local training samples
    aggregated_samples: int = 0
    known_peers: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    updates_sent: int = 0
    updates_received: int = 0
    updates_dropped: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0
    duration: float = 0.0
    sharing: dict[str, Any] = field(default_factory=dict)  # compression and privacy counters (SharingPipeline)
    spectral: dict[str, Any] = field(default_factory=dict)  # the latest analysis of the observed gossip graph

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("sharing"))
        d.update({f"spectral_{k}": v for k, v in d.pop("spectral").items()})
        return d


@dataclass
class NodeState:
    """What a checkpoint holds: named tensors (safetensors) plus JSON-safe metadata. Never pickled."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def build_aggregator(manifest: Manifest) -> Aggregator:
    entry = registry.resolve("aggregation", manifest.aggregation.name)
    params = registry.build_params(entry, dict(manifest.aggregation.params))
    return registry.load(entry)(params, byzantine_f=manifest.byzantine_f)


def build_topology(manifest: Manifest, node_id: str, rng: random.Random) -> Topology:
    entry = registry.resolve("topology", manifest.topology.name)
    params = registry.build_params(entry, dict(manifest.topology.params))
    return registry.load(entry)(params, node_id, rng)


def default_loss(manifest: Manifest) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification and segmentation, mean squared error for regression."""
    if manifest.task.type == "regression" or manifest.task.label_type == "float":
        return nn.MSELoss()
    return nn.CrossEntropyLoss()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if value is None:
        return "-"
    text = str(value)
    return text if text and " " not in text else repr(text)


def kv(**fields: Any) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


class Node:
    """One peer. See the module docstring for the order in which drivers call the steps."""

    def __init__(
        self,
        config: NodeConfig,
        manifest: Manifest,
        swarm_id: str,
        model: nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None,
        optimizer: torch.optim.Optimizer,
        transport: Transport,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        aggregator: Aggregator | None = None,
        topology: Topology | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.manifest = manifest
        self.swarm_id = swarm_id
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = optimizer
        self.transport = transport
        self.hooks: Hooks = hooks if hooks is not None else NoHooks()
        self.clock = clock
        self.loss_fn = loss_fn or default_loss(manifest)
        self.rng = random.Random(config.seed)
        self.aggregator = aggregator or build_aggregator(manifest)
        self.topology = topology or build_topology(manifest, self.node_id, self.rng)

        training = manifest.training
        self.local_epochs = config.local_epochs or training.local_epochs
        self.local_steps = config.local_steps if config.local_steps is not None else training.local_steps
        self.gossip_steps = training.gossip_steps
        self.final_consensus_steps = training.final_consensus_steps
        self.max_staleness = training.max_staleness
        # The manifest's round_limit is the swarm's maximum: --rounds may ask for fewer, never more.
        limits = [r for r in (config.rounds, manifest.round_limit) if r is not None]
        self.rounds = min(limits) if limits else None

        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.specs: list[TensorSpec] = shared_specs(model)
        self.max_update_bytes = config.max_update_bytes or wire.max_blob_bytes(self.specs) * 2
        # Local DP of what this node shares, and per-peer delta compression (strategies.sharing).
        dp_mask = None
        if manifest.privacy.dp_epsilon is not None:
            buffers = float_buffers(model)
            if buffers:
                more = f" and {len(buffers) - 3} more" if len(buffers) > 3 else ""
                raise NodeConfigError(
                    f"local DP cannot cover the model's floating-point buffers ({', '.join(buffers[:3])}{more}): "
                    "they are computed from the training data and would be shared without noise",
                    "use GroupNorm or LayerNorm instead of BatchNorm (as Opacus requires), register constant buffers "
                    "with persistent=False, or turn DP off")
            dp_mask = trainable_mask(model)
        self.sharing = SharingPipeline(manifest.compression, manifest.privacy, sum(s.numel for s in self.specs),
                                       noise_seed=config.noise_seed, dp_mask=dp_mask)
        self._sharing_stop_logged = False
        if config.spectral_every < 1 or config.spectral_window < 1:
            raise NodeConfigError(f"spectral_every and spectral_window must be >= 1, got {config.spectral_every} "
                                  f"and {config.spectral_window}")
        self.graph = GossipGraphMonitor(window=config.spectral_window, every=config.spectral_every)
        self._spectral: dict[str, Any] = {}

        self.round = 0  # the round in progress (1-based); after end_round, the last completed one
        self.completed_round = 0
        self.history: list[dict[str, Any]] = []
        self.known_peers: dict[str, PeerInfo] = {}
        self.discovered: set[str] = set()
        self.sample_count = self._dataset_size(train_loader)

        self.fingerprint_body: dict[str, Any] | None = None
        self.label_entropy: float | None = None
        self._init_fingerprint()

        self._inbox: dict[str, ModelReceived] = {}
        self._inbox_lock = threading.Lock()
        self._dropped_in_round = 0
        self._round_started = 0.0
        self._stats_at_start = (0, 0, 0, 0)
        self._train: TrainStats | None = None
        self._eval: tuple[float | None, float | None] = (None, None)
        self._eval_time = 0.0
        self._round_peers: list[str] = []
        self._round_agg_samples = 0
        self._peer_rounds: dict[str, int] = {}  # newest round of a valid update from each peer: the swarm's clock
        # Peers whose last update arrived close to (or past) the staleness limit: the driver paces on them.
        self._lagging: dict[str, int] = {}
        self._last_arrival: dict[str, tuple[float, int]] = {}  # per peer: (clock, round) of its newest round seen
        self._round_period: dict[str, float] = {}  # per peer: seconds per round, from its updates' arrivals
        self._pace_muted: dict[str, int] = {}  # per peer: no pacing on it before this round (it did not catch up)
        self._drop_logged: set[tuple[str, str]] = set()
        # Set by a driver: stop_flag ends local training at the next batch (a daemon asked to stop);
        # inbox_listener is called whenever an update lands in the inbox (a driver waiting for updates wakes up).
        self.stop_flag: threading.Event | None = None
        self.inbox_listener: Callable[[], None] | None = None
        if self.sharing.dp.enabled:
            dp, spec = self.sharing.dp, manifest.privacy
            self._log(logging.INFO, "dp-enabled", epsilon_per_round=spec.dp_epsilon, delta=f"{spec.dp_delta:g}",
                      clip_norm=spec.dp_clip_norm, sigma=round(dp.sigma, 6), total_epsilon=spec.dp_total_epsilon,
                      affordable_rounds=dp.max_releases)

    def _init_fingerprint(self) -> None:
        """This peer's data fingerprint, computed once when the manifest allows fingerprints: it goes to each
        discovered peer (AffinityTopology) and its label entropy rides on every update (EntropyWeightedAvg).
        The entropy is a statistic of the label buckets, so with ``privacy.fingerprint`` false it stays home too
        and EntropyWeightedAvg weighs this peer by ``fallback_weight`` (its note names the peers it did that for)."""
        if not self.manifest.privacy.fingerprint:
            return
        try:
            fp = fingerprint_for(self.manifest, self.train_loader, model=self.model, loss_fn=self.loss_fn,
                                 noise_seed=self.config.noise_seed)
        except Exception as exc:  # a fingerprint is an optimisation: the node works without one
            self._log(logging.WARNING, "fingerprint-unavailable", reason=_one_line(exc))
            return
        self.label_entropy = float(fp.entropy)
        self.fingerprint_body = fp.to_body()
        self.topology.observe_fingerprint(self.node_id, dict(self.fingerprint_body))

    # ----------------------------------------------------------------- logging and hooks
    def _log(self, level: int, event: str, **fields: Any) -> None:
        message = f"{event} {kv(**fields)}" if fields else event
        log.log(level, message, extra={"node": self.node_id, "round": self.round})

    def _call_hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.hooks, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a user hook must never take the node down
            tb = "".join(traceback.format_exception(exc)).rstrip().replace("\n", " | ")
            self._log(logging.ERROR, "hook-failed", hook=name, error=f"{type(exc).__name__}: {exc}", traceback=tb)

    # ----------------------------------------------------------------- transport events
    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.known_peers[peer.node_id] = peer
        if self.fingerprint_body is not None:
            # Also on rediscovery: a peer that restarted has forgotten what we told it.
            self.transport.send_message(peer.node_id, FINGERPRINT_KIND, dict(self.fingerprint_body))
        if peer.node_id in self.discovered:
            return
        self.discovered.add(peer.node_id)
        address = f"{peer.address[0]}:{peer.address[1]}" if peer.address else None
        self._log(logging.INFO, "peer-discovered", peer=peer.node_id, address=address, known=len(self.known_peers))
        self._call_hook("on_peer_discovered", peer.node_id)

    def on_peer_lost(self, peer: PeerInfo) -> None:
        if self.known_peers.pop(peer.node_id, None) is not None:
            self._log(logging.INFO, "peer-lost", peer=peer.node_id, known=len(self.known_peers))

    def on_model(self, update: ModelReceived) -> None:
        """Keep the newest update per sender; drop ones too old for the strategy or too large."""
        if update.sender == self.node_id:
            return
        self._log(logging.DEBUG, "update-received", peer=update.sender, update_round=update.round, bytes=len(update.payload))
        self._note_lag(update.sender, update.round)
        if self.sharing.is_compressed(update.payload):
            # Applied to the sender's reconstruction first, stale or not: a delta chain must not skip a link (the
            # next delta would be refused and a full-weights resync follow). The codec enforces the size limit.
            meta = self._receive_compressed(update)
            if meta is None:
                return
            self._note_round(update.sender, update.round)
            # Keep its meta (label entropy), not the bytes.
            update = dataclasses.replace(update, payload=b"", encoding=COMPRESSED_ENCODING, meta={**update.meta, **meta})
        elif len(update.payload) > self.max_update_bytes:
            self._drop(update.sender, update.round, f"{len(update.payload)} bytes exceeds limit {self.max_update_bytes}")
            return
        if update.round < self.round - self.max_staleness:
            self._drop(update.sender, update.round, f"stale (older than {self.max_staleness} rounds)")
            return
        with self._inbox_lock:
            old = self._inbox.get(update.sender)
            if old is not None and _order(old) > _order(update):
                return
            self._inbox[update.sender] = update
        if self.inbox_listener is not None:
            self.inbox_listener()

    def _receive_compressed(self, update: ModelReceived) -> dict[str, Any] | None:
        """Apply a compressed update to the sender's reconstruction; its meta, or None when dropped."""
        try:
            return self.sharing.receive(update.sender, update.payload, self.max_update_bytes)
        except StaleBase as exc:
            self._drop(update.sender, update.round, exc.message)
            self.transport.send_message(update.sender, RESYNC_KIND, {"round": update.round})
        except Exception as exc:
            self._drop(update.sender, update.round, f"{type(exc).__name__}: {exc}")
        return None

    def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        if kind == RESYNC_KIND:
            self.sharing.resync(sender)
            self._log(logging.INFO, "compression-resync", peer=sender, hint="next update to it carries full weights")
            return
        try:
            if kind == FINGERPRINT_KIND:
                self.topology.observe_fingerprint(sender, dict(body))
                return
            for peer_id, reply_kind, reply in self.topology.on_control(sender, kind, dict(body)):
                self.transport.send_message(peer_id, reply_kind, reply)
        except Exception as exc:
            self._log(logging.WARNING, "message-dropped", peer=sender, kind=kind, reason=f"{type(exc).__name__}: {exc}")

    def _note_lag(self, sender: str, round_: int) -> None:
        """Remember a peer whose update came ``pace_lag`` or more rounds behind ours, forget it once one comes closer.

        Only pacing reads this (a peer claiming an old round can at most make us wait a bounded time), so the
        claimed round of any authenticated update counts, before validation."""
        lag = self.round - round_
        now = self.clock()
        with self._inbox_lock:
            last = self._last_arrival.get(sender)
            if last is None or round_ > last[1]:
                if last is not None:
                    period = (now - last[0]) / (round_ - last[1])
                    old = self._round_period.get(sender)
                    self._round_period[sender] = period if old is None else 0.5 * (old + period)
                self._last_arrival[sender] = (now, round_)
            if lag >= self.pace_lag:
                self._lagging[sender] = lag
            else:
                self._lagging.pop(sender, None)

    @property
    def pace_lag(self) -> int:
        """How many rounds behind a peer's update may arrive before this node waits for that peer: at the staleness
        limit its next update would already be dropped."""
        return max(self.max_staleness, 1)

    def lagging_peers(self) -> dict[str, int]:
        """Known peers this node should wait for before its next round, with how many rounds they lag.

        Two signals: an update that arrived ``pace_lag`` or more rounds behind ours (noted on arrival), and, for a
        peer sending regularly (its round period known, heard from within three periods), a newest round more than
        ``pace_lag`` behind the round about to begin: between that peer's updates a faster node would otherwise
        race ahead again. A peer that sends rarely (a sparse topology) is not active and is never waited for."""
        now = self.clock()
        upcoming = self.completed_round + 1
        out: dict[str, int] = {}
        with self._inbox_lock:
            for p in self.known_peers:
                if self._pace_muted.get(p, 0) > self.round:
                    continue
                lag = self._lagging.get(p)
                last, period = self._last_arrival.get(p), self._round_period.get(p)
                if last is not None and period is not None and now - last[0] <= 3 * period:
                    behind = upcoming - last[1]
                    if behind > self.pace_lag:
                        lag = max(lag or 0, behind)
                if lag is not None:
                    out[p] = lag
        return out

    def round_period(self, peer: str) -> float | None:
        """Seconds per round of ``peer`` as its updates' arrivals show (None until two of its rounds arrived)."""
        with self._inbox_lock:
            return self._round_period.get(peer)

    def forget_lagging(self, timed_out: Iterable[str] = ()) -> None:
        """The driver has waited on the current notes: each observed lag costs at most one wait. Peers that did not
        catch up within it get no further wait for `PACE_MUTE_ROUNDS` rounds: a stalled or lying peer cannot hold
        this node back round after round."""
        with self._inbox_lock:
            self._lagging.clear()
            for peer in timed_out:
                self._pace_muted[peer] = self.round + PACE_MUTE_ROUNDS

    def _note_round(self, sender: str, round_: int) -> None:
        """A valid update of ``round_`` came from ``sender``: the swarm's clock counts only such updates."""
        self._peer_rounds[sender] = max(round_, self._peer_rounds.get(sender, round_))

    def _drop(self, sender: str, round_: int, reason: str) -> None:
        """Count and log a dropped update: the first of each kind per peer at WARNING, repeats at DEBUG."""
        self._dropped_in_round += 1
        kind = reason.split(" ", 1)[0].rstrip(":")
        first = (sender, kind) not in self._drop_logged
        self._drop_logged.add((sender, kind))
        level = logging.WARNING if first else logging.DEBUG
        self._log(level, "update-dropped", peer=sender, update_round=round_, reason=reason)

    # ----------------------------------------------------------------- round steps
    def begin_round(self) -> int:
        """Start the next round, or catch up with the swarm when most known peers are far ahead.

        A peer that restarted from an old checkpoint would otherwise stay behind for good (rounds advance at the
        same cadence everywhere) and have every update dropped as stale. It jumps to the highest round that a
        quorum of its known peers has reached, when that is more than ``max_staleness`` ahead, capped at the
        round limit. The quorum is a majority of the known peers and never fewer than two, and a peer's round
        counts only from updates that decoded and validated: neither one peer (a liar, or the only other peer of
        a two-peer swarm) nor a minority claiming huge rounds can push it to the end of training.
        """
        self.round = self.completed_round + 1
        # Peers not heard from yet count as being where we are.
        rounds = sorted((self._peer_rounds.get(p, self.round) for p in self.known_peers), reverse=True)
        quorum = max(2, len(rounds) - (len(rounds) - 1) // 2)
        if len(rounds) >= quorum and rounds[quorum - 1] > self.round + self.max_staleness:
            reached = rounds[quorum - 1]
            target = reached if self.rounds is None else min(reached, self.rounds)
            if target > self.round:
                self._log(logging.INFO, "caught-up", from_round=self.round, to_round=target, peers=len(rounds),
                          quorum=quorum)
                self.round = target
                self.completed_round = target - 1
        self._round_started = self.clock()
        st = self.transport.stats
        self._stats_at_start = (st.bytes_sent, st.bytes_received, st.models_sent, st.models_received)
        self._dropped_in_round = 0
        self._train = None
        self._eval = (None, None)
        self._eval_time = 0.0
        self._round_peers = []
        self._round_agg_samples = 0
        self._log(logging.DEBUG, "round-start", known_peers=len(self.known_peers))
        return self.round

    def _lr(self) -> float:
        groups = self.optimizer.param_groups
        lr = groups[0].get("lr", 0.0) if groups else 0.0
        return float(lr)

    def train_round(self) -> TrainStats:
        """Local training: ``local_epochs`` passes over the training data, at most ``local_steps`` optimizer steps."""
        started = time.perf_counter()
        model = self.model
        model.train()
        lr = self._lr()
        self.aggregator.begin_training(model, lr)
        if self.sharing.dp.enabled:
            self.sharing.begin_training(flatten(model))
        total_loss = 0.0
        correct = 0
        seen = 0
        steps = 0
        samples_first_epoch = 0
        done = False
        for epoch in range(self.local_epochs):
            for batch in self.train_loader:
                x, y = _split_batch(batch, self.device)
                self.optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = self.loss_fn(out, y)
                extra = self.aggregator.loss_term(model)
                if extra is not None:
                    loss = loss + extra
                if not torch.isfinite(loss):
                    raise NodeConfigError(f"training loss became {loss.item()} in round {self.round}",
                                          "lower the learning rate in build_optimizer")
                loss.backward()
                self.aggregator.after_backward(model)
                self.optimizer.step()
                n = _batch_len(y)
                total_loss += float(loss.detach()) * n
                seen += n
                if epoch == 0:
                    samples_first_epoch += n
                hits = _correct(out.detach(), y)
                if hits is not None:
                    correct += hits
                steps += 1
                if (self.local_steps is not None and steps >= self.local_steps) or (
                    self.stop_flag is not None and self.stop_flag.is_set()
                ):
                    done = True
                    break
            if done:
                break
        self.aggregator.end_training(model, steps, lr)
        if self.sharing.dp.enabled:
            noised = self.sharing.end_training(flatten(model))  # clip + noise the round's update, keep it
            if noised is not None:
                load_flat(model, noised)
        if self.sample_count <= 0:
            self.sample_count = samples_first_epoch
        stats = TrainStats(
            loss=total_loss / seen if seen else None,
            accuracy=correct / seen if seen and self._is_classification() else None,
            samples=self.sample_count or samples_first_epoch,
            steps=steps,
            duration=time.perf_counter() - started,
        )
        self._train = stats
        self._log(logging.DEBUG, "trained", loss=stats.loss, accuracy=stats.accuracy, steps=steps, seconds=stats.duration)
        return stats

    def evaluate(self) -> tuple[float | None, float | None]:
        """(val_loss, val_accuracy) on the validation loader; (None, None) when there is none or it is empty."""
        if self.val_loader is None:
            return (None, None)
        started = time.perf_counter()
        model = self.model
        model.eval()
        total = 0.0
        correct = 0
        seen = 0
        with torch.no_grad():
            for batch in self.val_loader:
                x, y = _split_batch(batch, self.device)
                out = model(x)
                n = _batch_len(y)
                total += float(self.loss_fn(out, y)) * n
                hits = _correct(out, y)
                if hits is not None:
                    correct += hits
                seen += n
        result = (total / seen if seen else None, correct / seen if seen and self._is_classification() else None)
        self._eval = result
        self._eval_time = time.perf_counter() - started
        return result

    def _is_classification(self) -> bool:
        return self.manifest.task.type in ("classification", "segmentation")

    # --------------------------------------------------------------- send path
    def encode_update(self, step: int = 0, targets: Sequence[str] = ()) -> OutgoingUpdate:
        """The one place the outgoing update is built: compression and privacy transform it here."""
        state = self.model.state_dict()
        tensors: dict[str, torch.Tensor] = {s.name: state[s.name] for s in self.specs}
        for name, t in self.aggregator.extras_to_send().items():
            tensors[EXTRA_PREFIX + name] = t
        meta = self._update_meta(step, targets)
        payload = wire.encode(tensors, meta=meta)
        return OutgoingUpdate(round=self.round, payload=payload, sample_count=int(self.sample_count), meta=meta)

    def _update_meta(self, step: int, targets: Sequence[str]) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": step}
        if self.label_entropy is not None:
            meta[LABEL_ENTROPY_KEY] = self.label_entropy
        if targets:
            meta[GOSSIP_TO_KEY] = _gossip_to(targets)
        return meta

    def share(self, step: int = 0) -> list[str]:
        """Send the current model to the peers the topology picks; returns them. Never blocks."""
        peers = sorted(self.known_peers)
        if not peers:
            return []
        if self.sharing.sharing_stopped:
            if not self._sharing_stop_logged:
                self._sharing_stop_logged = True
                eps, delta = self.sharing.dp.spent()
                self._log(logging.WARNING, "dp-budget-exhausted", releases=self.sharing.dp.releases,
                          epsilon_spent=round(eps, 4), delta=f"{delta:g}",
                          total=self.manifest.privacy.dp_total_epsilon, hint="this node no longer shares its model")
            return []
        try:
            targets = [p for p in self.topology.select(peers, self.round) if p != self.node_id]
        except Exception as exc:
            self._log(logging.ERROR, "topology-failed", error=f"{type(exc).__name__}: {exc}")
            return []
        for peer_id, kind, body in self.topology.control_messages(self.round):
            self.transport.send_message(peer_id, kind, body)
        if not targets:
            return []
        for peer_id in targets:
            self.graph.record(self.node_id, peer_id, self.round)
        if self.sharing.compress_sends:
            return self._share_compressed(targets, step)
        update = self.encode_update(step, targets)
        for peer_id in targets:
            self.transport.send_model(peer_id, update)
        self._log(logging.DEBUG, "shared", to=targets, bytes=len(update.payload), step=step)
        return targets

    def _share_compressed(self, targets: list[str], step: int) -> list[str]:
        """Each recipient gets the delta against what it holds from us (strategies.compression)."""
        flat = flatten(self.model)
        extras = self.aggregator.extras_to_send()
        meta = self._update_meta(step, targets)
        sizes = []
        for peer_id in targets:
            enc = self.sharing.encode(peer_id, flat, extras, meta)
            self.transport.send_model(peer_id, OutgoingUpdate(round=self.round, payload=enc.payload,
                                                              sample_count=int(self.sample_count),
                                                              encoding=COMPRESSED_ENCODING, meta=meta))
            sizes.append(enc.wire_bytes)
        self._log(logging.DEBUG, "shared", to=targets, bytes=sum(sizes), step=step, compressed=True)
        return targets

    # --------------------------------------------------------------- receive path
    def decode_update(self, msg: ModelReceived) -> PeerUpdate:
        """The one place an incoming update becomes a flat vector: decompression hooks in here. Raises on bad input."""
        if msg.encoding == COMPRESSED_ENCODING:
            return self._decoded_compressed(msg)
        tensors, meta = wire.decode(msg.payload, max_entries=len(self.specs) + 64, max_bytes=self.max_update_bytes)
        model_tensors = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
        extras = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
        wire.check_against(model_tensors, self.specs)
        for name, t in extras.items():
            wire.check_finite(name, t)
        flat = torch.cat([model_tensors[s.name].reshape(-1).to(torch.float32) for s in self.specs]) if self.specs else torch.empty(0)
        samples = int(msg.sample_count)
        if samples <= 0:
            raise ValueError(f"sample count {samples} is not positive")
        return PeerUpdate(
            peer_id=msg.sender,
            round=msg.round,
            flat=flat,
            sample_count=min(samples, MAX_REPORTED_SAMPLES),
            meta={**msg.meta, **meta},
            extras=extras,
        )

    def _decoded_compressed(self, msg: ModelReceived) -> PeerUpdate:
        """The sender's model as reconstructed on arrival (`_receive_compressed`)."""
        held = self.sharing.model_of(msg.sender)
        if held is None:
            raise ValueError("no reconstructed model for this sender (its state was evicted)")
        flat, extras = held
        samples = int(msg.sample_count)
        if samples <= 0:
            raise ValueError(f"sample count {samples} is not positive")
        return PeerUpdate(peer_id=msg.sender, round=msg.round, flat=flat,
                          sample_count=min(samples, MAX_REPORTED_SAMPLES), meta=dict(msg.meta), extras=extras)

    def pending_senders(self) -> set[str]:
        with self._inbox_lock:
            return set(self._inbox)

    def has_fresh_update_from_all(self) -> bool:
        """True when every known peer has an update of this round (or newer) waiting: no reason to wait longer."""
        if not self.known_peers:
            return False
        with self._inbox_lock:
            return all(p in self._inbox and self._inbox[p].round >= self.round for p in self.known_peers)

    def aggregate(self) -> AggregationOutcome | None:
        """Aggregate what the inbox holds with the local model and load the result; None when nothing usable arrived."""
        with self._inbox_lock:
            inbox = list(self._inbox.values())
            self._inbox.clear()
        others: list[PeerUpdate] = []
        inbox.sort(key=lambda m: m.sender, reverse=True)
        while inbox:
            msg = inbox.pop()  # each payload is released once decoded: peak memory stays ~one update's bytes
            if msg.round < self.round - self.max_staleness:
                self._drop(msg.sender, msg.round, f"stale (older than {self.max_staleness} rounds)")
                continue
            try:
                others.append(self.decode_update(msg))
            except Exception as exc:
                self._drop(msg.sender, msg.round, f"invalid: {_one_line(exc)}")
                continue
            self._note_round(msg.sender, msg.round)
        if not others:
            return None
        local_meta = {LABEL_ENTROPY_KEY: self.label_entropy} if self.label_entropy is not None else {}
        local = PeerUpdate(self.node_id, self.round, flatten(self.model), max(int(self.sample_count), 1),
                           meta=local_meta, is_local=True)
        try:
            result = self.aggregator.aggregate(local, others, self.round)
            if result.flat.shape != local.flat.shape or not all_finite(result.flat):
                raise ValueError("aggregate is not a finite vector of the model's size")
            load_flat(self.model, result.flat)
        except Exception as exc:
            for u in others:
                self._drop(u.peer_id, u.round, f"aggregation failed: {_one_line(exc)}")
            self._log(logging.ERROR, "aggregation-failed", strategy=self.aggregator.name, error=_one_line(exc))
            return None
        used = [p for p in result.used if p != self.node_id]
        samples = int(local.sample_count) + sum(u.sample_count for u in others if u.peer_id in used)
        for pid in result.rejected:
            self._log(logging.WARNING, "update-rejected", peer=pid, strategy=self.aggregator.name, note=result.note or None)
        try:  # collaboration history, graded by how close each update came to the result (AffinityTopology)
            self.topology.observe_aggregation(local, others, result)
        except Exception as exc:
            self._log(logging.ERROR, "topology-failed", error=_one_line(exc))
        for u in others:
            if u.peer_id in used:
                self._observe_edges(u)
        outcome = AggregationOutcome(peers=used, rejected=list(result.rejected), samples=samples, note=result.note)
        for p in used:
            if p not in self._round_peers:
                self._round_peers.append(p)
        self._round_agg_samples = samples
        fields: dict[str, Any] = {"peers": len(used), "samples": samples, "from": used, "strategy": self.aggregator.name}
        if result.note:
            fields["note"] = result.note
        self._log(logging.INFO, "aggregated models", **fields)
        self._call_hook("on_aggregation_done", list(used), samples)
        return outcome

    def _observe_edges(self, update: PeerUpdate) -> None:
        """The gossip edges an aggregated update shows: its sender to us, and to the recipients it names (only
        peers we know: a peer cannot fill the graph with invented nodes)."""
        self.graph.record(update.peer_id, self.node_id, self.round)
        named = update.meta.get(GOSSIP_TO_KEY)
        if isinstance(named, str):
            for peer_id in named.split(",")[:MAX_GOSSIP_TO]:
                if peer_id in self.known_peers or peer_id == self.node_id:
                    self.graph.record(update.peer_id, peer_id, self.round)

    def _analyze_graph(self) -> None:
        """Every ``spectral_every`` rounds: the spectral numbers of the observed gossip graph, logged and kept for
        the round metrics (`strategies.spectral`)."""
        self.graph.add_node(self.node_id, self.round)
        if not self.graph.due(self.round):
            return
        fields = self.graph.report(self.round).fields()
        self._spectral = {"round": self.round, **fields}
        self._log(logging.INFO, "spectral", window=self.graph.window, **fields)

    def end_round(self) -> RoundMetrics:
        """Close the round: metrics, history, ``on_round_end``."""
        self._analyze_graph()
        st = self.transport.stats
        s0 = self._stats_at_start
        train = self._train
        val_loss, val_acc = self._eval
        metrics = RoundMetrics(
            round=self.round,
            loss=train.loss if train else None,
            accuracy=train.accuracy if train else None,
            val_loss=val_loss,
            val_accuracy=val_acc,
            peers=len(self._round_peers),
            peer_ids=list(self._round_peers),
            samples=train.samples if train else int(self.sample_count),
            aggregated_samples=self._round_agg_samples,
            known_peers=len(self.known_peers),
            bytes_sent=st.bytes_sent - s0[0],
            bytes_received=st.bytes_received - s0[1],
            updates_sent=st.models_sent - s0[2],
            updates_received=st.models_received - s0[3],
            updates_dropped=self._dropped_in_round,
            train_time=train.duration if train else 0.0,
            eval_time=self._eval_time,
            duration=self.clock() - self._round_started,
            sharing=self.sharing.round_metrics(),
            spectral=dict(self._spectral),
        )
        self.completed_round = self.round
        d = metrics.as_dict()
        self.history.append(d)
        self._log(
            logging.INFO, "round-end",
            loss=metrics.loss, accuracy=metrics.accuracy, val_loss=metrics.val_loss, val_accuracy=metrics.val_accuracy,
            peers=metrics.peers, samples=metrics.samples, bytes_sent=metrics.bytes_sent,
            bytes_received=metrics.bytes_received, seconds=metrics.duration, **self.sharing.log_fields(metrics.sharing),
        )
        self._call_hook("on_round_end", self.round, dict(d))
        return metrics

    def finished(self) -> bool:
        return self.rounds is not None and self.completed_round >= self.rounds

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> NodeState:
        """Everything a restarted node needs, as tensors + JSON (see `quinkgl_cli.node.checkpoint`).

        CPU tensors are views of the live state, not copies (the daemon serializes them at once, one memcpy):
        serialize or clone them before the node trains again."""
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            tensors[f"model.{name}"] = t.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = _json_scalar(value)
        for key, value in self.aggregator.state_dict().items():
            tensors[f"aggregator.{key}"] = value.detach().cpu().contiguous()
        for key, value in self.sharing.state_dict().items():
            tensors[f"sharing.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        topo_tensors, topo_json = _split_tensors(self.topology.state_dict())
        for key, value in topo_tensors.items():
            tensors[f"topology.{key}"] = value
        meta = {
            "node_id": self.node_id,
            "swarm_id": self.swarm_id,
            "round": self.completed_round,
            "sample_count": int(self.sample_count),
            "history": self.history,
            "optimizer": {
                "param_groups": [_json_group(g) for g in opt["param_groups"]],
                "scalars": opt_scalars,
            },
            "topology": topo_json,
            "rng": {
                "python": _py_rng_to_json(random.getstate()),
                "node": _py_rng_to_json(self.rng.getstate()),
                "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            },
            "known_peers": sorted(self.discovered),
        }
        return NodeState(tensors=tensors, meta=meta)

    def load_state_dict(self, state: NodeState) -> None:
        """Restore a node saved by `state_dict`; the model and optimizer must be the same shapes."""
        t = state.tensors
        meta = state.meta
        model_state = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model (missing {len(missing)}, unexpected {len(unexpected)} entries)")
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in t.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        for idx, scalars in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.aggregator.load_state_dict({k[len("aggregator."):]: v for k, v in t.items() if k.startswith("aggregator.")})
        topo = dict(meta.get("topology") or {})
        topo.update({k[len("topology."):]: v for k, v in t.items() if k.startswith("topology.")})
        self.topology.load_state_dict(topo)
        self.sharing.load_state_dict({k[len("sharing."):]: v for k, v in t.items() if k.startswith("sharing.")})
        if "rng.torch" in t:
            torch.set_rng_state(t["rng.torch"].to(torch.uint8))
        rng = meta.get("rng", {})
        if "python" in rng:
            random.setstate(_py_rng_from_json(rng["python"]))
        if "node" in rng:
            self.rng.setstate(_py_rng_from_json(rng["node"]))
        if "numpy" in rng and "rng.numpy" in t:
            name, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, t["rng.numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        self.completed_round = int(meta["round"])
        self.round = self.completed_round
        self.history = list(meta.get("history", []))
        if int(meta.get("sample_count", 0)) > 0 and self.sample_count <= 0:
            self.sample_count = int(meta["sample_count"])

    # --------------------------------------------------------------- helpers
    @staticmethod
    def _dataset_size(loader: Any) -> int:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            try:
                return int(len(dataset))
            except TypeError:
                return 0
        return 0


def _gossip_to(targets: Sequence[str]) -> str:
    """The ``GOSSIP_TO_KEY`` value: recipients, comma-separated, as many as fit the bounds."""
    text = ""
    for peer_id in sorted(targets)[:MAX_GOSSIP_TO]:
        longer = f"{text},{peer_id}" if text else peer_id
        if len(longer) > MAX_GOSSIP_TO_CHARS:
            break
        text = longer
    return text


def _order(update: ModelReceived) -> tuple[int, int, float]:
    step = update.meta.get("step", 0) if isinstance(update.meta, dict) else 0
    return (update.round, int(step) if isinstance(step, (int, float)) else 0, update.received_at)


def _one_line(exc: BaseException) -> str:
    if hasattr(exc, "one_line"):
        return exc.one_line()  # type: ignore[no-any-return]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _split_batch(batch: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch, on the model's device (loaders yield CPU tensors; a script may build a GPU model)."""
    if isinstance(batch, dict):
        x, y = batch.get("x", batch.get("input")), batch.get("y", batch.get("target"))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise NodeConfigError(f"a batch must be (inputs, targets), got {type(batch).__name__}",
                              "make build_loaders return loaders that yield (x, y) pairs")
    if device.type != "cpu":
        x = x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        y = y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else y
    return x, y


def _batch_len(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 1


def _correct(out: torch.Tensor, y: torch.Tensor) -> int | None:
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or out.dim() < 2:
        return None
    pred = out.argmax(dim=1)
    target = y.argmax(dim=1) if y.is_floating_point() and y.dim() == out.dim() else y
    if target.shape != pred.shape:
        return None
    return int((pred == target).sum())


def _json_scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_scalar(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise ValueError(f"optimizer state value of type {type(value).__name__} cannot be checkpointed")


def _json_group(group: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_scalar(v) for k, v in group.items()}


def _split_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def _py_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data: Sequence[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (int(version), tuple(int(v) for v in internal), gauss)
