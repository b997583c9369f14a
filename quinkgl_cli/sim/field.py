"""The field driver: every simulated peer runs the daemon's own round loop (`quinkgl_cli.node.runloop.RoundLoop`) on
one event loop in virtual time (`quinkgl_cli.sim.vloop`), under the conditions of a `FieldConfig`.

So the daemon's pacing, staleness and timeout rules are the ones simulated, not a copy of them: rounds start every
``gossip_interval`` virtual seconds (at once when the previous one ran over), each gossip step waits until every known
peer's update of this round arrived or the step's deadline passed, a node waits (bounded) for lagging peers, drops
stale updates, and jumps ahead when a quorum of peers is far ahead. What the driver adds:

- training runs in place (the loop is single-threaded, so a run is deterministic) and is then charged the peer's
  virtual duration: one draw of ``speed`` per peer (its hardware), e.g. ``straggler:1:0.1:10`` for a 10x tail;
  evaluation costs no virtual time (under a trace, its recorded seconds, and the end-of-round checkpoint's);
- messages travel through `FieldNetwork`: lost with probability ``drop``, else delivered ``latency + size /
  bandwidth`` virtual seconds later;
- churn: in the middle of each interval from the second to the one before last, a share ``churn`` of the peers
  online leaves abruptly (its round in progress abandoned, as a daemon stopped by a signal), and comes back
  ``churn_away`` intervals later on average (drawn between half and one and a half times that). It comes back as a
  daemon restarted from its last checkpoint (the end of its last completed round, kept in memory), or, for a share
  ``churn_fresh`` (and any peer that never completed a round), from scratch at round 0, to catch up through the
  node's quorum rule;
- late joiners: a share ``late_join`` of the peers first joins at a random time in the first half of the run, from
  scratch;
- or, with a trace (`quinkgl_cli.sim.replay`), each peer's recorded training times, transfers, arrivals and
  departures instead of the drawn ones, and its recorded evaluation and end-of-round saving times (charged after
  the round's last exchange, as the daemon spends them; without a trace they cost no virtual time).

Every concern draws from its own stream seeded by ``--seed`` (churn, late joiners, per-peer speed, and the network's
loss, latency and bandwidth), so a run is repeatable and turning one condition on does not reshuffle another.

Reported per round: the metrics of each peer that completed that round (its last incarnation to do so), so the
curve's peers differ between rounds when peers leave or skip rounds by catching up; the final line is each peer's
evaluation after its final consensus, or, when that was skipped (every other peer had left, as a straggler finds at
its end), of its last round, as the daemon's ``finished`` line reports. Progress lines come at the end, in round
order, as peers finish rounds at different virtual times. Owns the peers' incarnations, the churn schedule and these
summaries.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from quinkgl_cli.errors import UsageError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodePolicies, RoundMetrics, build_aggregator
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.node.metrics import PERSONAL_FIELDS
from quinkgl_cli.node.options import ScheduleOptions
from quinkgl_cli.node.runloop import RoundLoop, Waiter, Work
from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.node.state import NodeState
from quinkgl_cli.sim.attacks import Eavesdrop
from quinkgl_cli.sim.config import SimConfig
from quinkgl_cli.sim.fieldconf import FieldConfig
from quinkgl_cli.sim.fieldnet import FieldNetwork
from quinkgl_cli.sim.replay import TraceReplay
from quinkgl_cli.sim.results import RoundSummary, SimResult, summarize
from quinkgl_cli.sim.simulator import Simulator
from quinkgl_cli.sim.swarm import SwarmBuilder
from quinkgl_cli.sim.vloop import VirtualTimeLoop

log = logging.getLogger("quinkgl.sim")


@dataclass
class Peer:
    """One simulated peer across its incarnations (a restart builds a new `Node` with the same id and data)."""

    index: int
    node: Node
    train_seconds: float
    task: asyncio.Task[None] | None = None
    checkpoint: NodeState | None = None  # the end of its last completed round
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)  # round -> metrics of the incarnation that ran it
    final: dict[str, Any] | None = None
    joined_at: list[float] = field(default_factory=list)  # virtual time of each incarnation's start
    left: int = 0
    resumed: int = 0
    fresh: int = 0

    @property
    def online(self) -> bool:
        return self.task is not None and not self.task.done()


async def _in_place(step: Callable[[], Any]) -> Any:
    return step()


def _charged(seconds: Callable[[], float]) -> Callable[[Callable[[], Any]], Awaitable[Any]]:
    """Training in place, then ``seconds()`` of virtual time (read when the round's training is done)."""
    async def train(step: Callable[[], Any]) -> Any:
        result = step()
        await asyncio.sleep(seconds())
        return result
    return train


def _last_evaluation(node: Node) -> dict[str, Any]:
    """The evaluation of ``node``'s last round (the final line of a peer whose final consensus was skipped)."""
    last = node.recorder.last()
    return {k: last[k] for k in ("val_loss", "val_accuracy", *PERSONAL_FIELDS) if last.get(k) is not None}


def _clone(state: NodeState) -> NodeState:
    return NodeState({k: v.detach().clone() for k, v in state.tensors.items()}, copy.deepcopy(state.meta))


class FieldSimulator(Simulator):
    """`Simulator` whose rounds run under field conditions (``config.conditions``), gossip mode only."""

    def __init__(self, script: PeerScript, manifest: Manifest, config: SimConfig,
                 progress: Callable[[RoundSummary], None] | None = None) -> None:
        super().__init__(script, manifest, config, progress)
        if config.mode != "gossip":
            raise UsageError(f"field conditions (--latency, --bandwidth, --drop, --churn, --speed, ...) need --mode gossip,"
                             f" not {config.mode}", "drop the field flags or use --mode gossip")
        self.field: FieldConfig = config.conditions or FieldConfig()
        f = self.field
        self.replay = TraceReplay(f.trace) if f.trace is not None else None
        if self.replay is not None:
            self.replay.check_peers(config.peers)
        self.network = FieldNetwork(self.clock, config.seed, f.latency, f.bandwidth, f.drop)
        self.peers: list[Peer] = []
        self._builder: SwarmBuilder | None = None
        self._churn_rng = random.Random(f"churn:{config.seed}")
        self._pending = 0  # joins and returns scheduled, not yet happened
        self._idle: asyncio.Event | None = None
        self._failures: list[BaseException] = []
        self._counts = {"left": 0, "resumed": 0, "fresh": 0, "late": 0}

    def build(self) -> None:
        super().build()
        self._builder = SwarmBuilder(self.script, self.manifest, self.swarm_id, self.config, self.rounds,
                                     self.network, self.clock)
        speed = self.field.speed
        for i, node in enumerate(self.nodes):
            seconds = speed.draw(random.Random(f"speed:{self.config.seed}:{node.node_id}"))
            self.peers.append(Peer(i, node, seconds))
        replay = self.replay
        if replay is not None:
            index = {p.node.node_id: p.index for p in self.peers}
            assert isinstance(self.network, FieldNetwork)
            self.network.replay = lambda src, dst, round_: replay.transfer_seconds(index[src], index[dst], round_)

    def _train_seconds(self, peer: Peer) -> float:
        if self.replay is None:
            return peer.train_seconds
        return self.replay.nodes[peer.index].train_seconds(peer.node.round)

    # ------------------------------------------------------------------------------------- incarnations
    def _rebuild(self, peer: Peer) -> Node:
        """A new node for ``peer``'s id, data and seed, as the daemon builds it at a start (round 0)."""
        assert self._builder is not None
        old = peer.node
        tamper = old.exchange.tamper
        extra: dict[str, Any] = {"policies": NodePolicies(tamper=tamper)} if tamper is not None else {}
        if isinstance(old.aggregator, Eavesdrop):
            # An attacker keeps what it learnt across a restart; its aggregation rule starts afresh, as a daemon's.
            old.aggregator.inner = build_aggregator(self._builder.manifest)
            extra["aggregator"] = old.aggregator
        seed = self.config.seed * 100_003 + peer.index
        return self._builder.node(old.node_id, old.trainer.train_loader, old.trainer.val_loader, seed, **extra)

    def _start(self, peer: Peer, node: Node) -> None:
        peer.node = node
        peer.joined_at.append(self.clock.now)
        waiter = Waiter()
        node.inbox.listener = waiter.inbox_event.set
        schedule = ScheduleOptions(rounds=self.rounds, gossip_interval=self.field.gossip_interval)
        replay = self.replay
        evaluate = _in_place if replay is None else _charged(lambda: replay.nodes[peer.index].eval_seconds(peer.node.round))
        loop = RoundLoop(node, schedule, waiter, LogContext(node.node_id), [], time.monotonic(),
                         lambda m: self._after_round(peer, m),
                         work=Work(train=_charged(lambda: self._train_seconds(peer)), evaluate=evaluate))
        peer.task = asyncio.get_running_loop().create_task(self._run_peer(peer, node, loop))
        peer.task.add_done_callback(self._ended)

    async def _run_peer(self, peer: Peer, node: Node, loop: RoundLoop) -> None:
        try:
            await loop.rounds()
            if node.final_consensus_steps:
                await loop.final_consensus()
            peer.final = loop.final_eval if loop.final_eval is not None else _last_evaluation(node)
        finally:
            node.transport.stop_sync()  # type: ignore[attr-defined]

    async def _after_round(self, peer: Peer, metrics: RoundMetrics) -> None:
        peer.rounds[metrics.round] = metrics.as_dict()
        if self.replay is not None or (self.field.churn > 0 and self.field.churn_fresh < 1):
            peer.checkpoint = _clone(peer.node.state_dict())
        if self.replay is not None:
            await asyncio.sleep(self.replay.nodes[peer.index].save_seconds(metrics.round))

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._failed(error)
        else:
            self._check_idle()

    def _failed(self, exc: BaseException) -> None:
        """A delivery or a peer's loop raised: the run stops and raises it (errors are never swallowed)."""
        self._failures.append(exc)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and (self._failures or (self._pending == 0 and not any(p.online for p in self.peers))):
            self._idle.set()

    # ------------------------------------------------------------------------------------- churn
    def _churn_tick(self) -> None:
        online = [p for p in self.peers if p.online and not p.node.finished()]
        share = self.field.churn * len(online)
        count = int(share) + (1 if self._churn_rng.random() < share - int(share) else 0)
        for peer in self._churn_rng.sample(online, min(count, len(online))):
            away = self._churn_rng.uniform(0.5, 1.5) * self.field.churn_away * self.field.gossip_interval
            self._leave(peer, away)

    def _leave(self, peer: Peer, away: float | None) -> None:
        """``peer`` stops abruptly; it returns after ``away`` seconds (None: as its trace says, or never)."""
        if not peer.online or peer.node.finished():
            return
        assert peer.task is not None
        peer.task.cancel()  # the round in progress is abandoned, as under a signal
        peer.node.transport.stop_sync()  # type: ignore[attr-defined]
        peer.left += 1
        self._counts["left"] += 1
        emit(log, logging.DEBUG, "sim-peer-left", peer=peer.node.node_id, away_s=None if away is None else round(away, 3))
        if away is not None:
            self._schedule_join(peer, away, late=False)

    def _schedule_join(self, peer: Peer, delay: float, late: bool, fresh: bool | None = None) -> None:
        self._pending += 1
        asyncio.get_running_loop().call_later(delay, self._join, peer, late, fresh)

    def _join(self, peer: Peer, late: bool, fresh: bool | None) -> None:
        """``peer`` (back) in the swarm: from scratch when ``late``, ``fresh`` or without a checkpoint; when
        ``fresh`` is None, from scratch for a share ``churn_fresh`` of returns."""
        self._pending -= 1
        if peer.online or (not late and peer.final is not None):  # it never left, or it already ended its run
            self._check_idle()
            return
        if fresh is None:
            fresh = self._churn_rng.random() < self.field.churn_fresh
        fresh = late or fresh or peer.checkpoint is None
        node = self._rebuild(peer)
        if fresh:
            peer.fresh += 1
            self._counts["late" if late else "fresh"] += 1
        else:
            assert peer.checkpoint is not None
            node.load_state_dict(peer.checkpoint)
            peer.resumed += 1
            self._counts["resumed"] += 1
        emit(log, logging.DEBUG, "sim-peer-joined", peer=node.node_id, from_round=node.completed_round, late=late)
        self._start(peer, node)

    # ------------------------------------------------------------------------------------- the run
    async def _swarm(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        f, interval = self.field, self.field.gossip_interval
        late_rng = random.Random(f"late:{self.config.seed}")
        late = set(late_rng.sample(range(len(self.peers)), int(round(f.late_join * len(self.peers)))))
        if self.replay is not None:
            late = self._replay_presence()
        for peer in self.peers:
            if peer.index in late and self.replay is None:
                peer.node.transport.stop_sync()  # type: ignore[attr-defined]
                self._schedule_join(peer, late_rng.uniform(0.0, self.rounds * interval / 2), late=True)
        for peer in self.peers:
            if peer.index not in late:
                self._start(peer, peer.node)
        if f.churn > 0:  # mid-interval, when peers are waiting for updates: no tie with a round's start
            for k in range(1, self.rounds - 1):
                loop.call_at((k + 0.5) * interval, self._churn_tick)
        await self._idle.wait()
        for peer in self.peers:  # after a failure: stop the others' loops
            if peer.task is not None and not peer.task.done():
                peer.task.cancel()

    def _replay_presence(self) -> set[int]:
        """Schedule the trace's arrivals and departures; the peers that join after the start."""
        assert self.replay is not None
        loop = asyncio.get_running_loop()
        late: set[int] = set()
        for peer, trace in zip(self.peers, self.replay.nodes, strict=True):
            for i, stay in enumerate(trace.presence):
                if i == 0 and stay.start > 0:
                    late.add(peer.index)
                    peer.node.transport.stop_sync()  # type: ignore[attr-defined]
                    self._schedule_join(peer, stay.start, late=True)
                elif i > 0:
                    self._schedule_join(peer, stay.start, late=False, fresh=not stay.resumed)
                if stay.stop is not None:
                    loop.call_at(stay.stop, self._leave, peer, None)
        return late

    def _run(self) -> SimResult:
        if not self.nodes:
            self.build()
        started = time.perf_counter()
        loop = VirtualTimeLoop(self.clock)
        loop.set_exception_handler(lambda _loop, context: self._failed(
            context.get("exception") or RuntimeError(str(context.get("message")))))
        loop.run_virtual(self._swarm())
        if self._failures:
            raise self._failures[0]
        self.nodes = [p.node for p in self.peers]
        attackers = set(self.attackers)
        summaries = []
        for r in range(1, self.rounds + 1):
            ran = [p for p in self.peers if r in p.rounds]
            metrics = {p.node.node_id: p.rounds[r] for p in ran}
            summaries.append(summarize(r, "train", started, [p.node for p in ran], [p.node for p in ran], attackers, metrics))
        consensus = None
        if self.manifest.training.final_consensus_steps:
            done = [p for p in self.peers if p.final is not None]
            consensus = summarize(self.rounds, "consensus", started, [p.node for p in done], [], attackers,
                                  {p.node.node_id: p.final or {} for p in done})
        if self.progress is not None:
            for summary in summaries + ([consensus] if consensus is not None else []):
                self.progress(summary)
        result = self._result(summaries, consensus, started)
        result.timing["virtual_s"] = self.clock.now
        result.conditions = self.describe()
        return result

    def describe(self) -> dict[str, Any]:
        """The conditions as asked and what they did (JSON-safe)."""
        f, net = self.field, self.network
        assert isinstance(net, FieldNetwork)
        return {
            "latency": f.latency.spec, "bandwidth": f.bandwidth.spec if f.bandwidth else None, "drop": f.drop,
            "churn": f.churn, "churn_away": f.churn_away, "churn_fresh": f.churn_fresh, "late_join": f.late_join,
            "speed": f.speed.spec, "gossip_interval": f.gossip_interval,
            "trace": str(f.trace) if f.trace is not None else None,
            "messages_lost": net.lost, "messages_carried": net.carried, "departures": self._counts["left"],
            "returns_from_checkpoint": self._counts["resumed"], "returns_from_scratch": self._counts["fresh"],
            "late_joins": self._counts["late"],
            # per peer: its drawn training seconds, or under a trace the median of those it recorded
            "train_seconds": {p.node.node_id: p.train_seconds if self.replay is None
                              else self.replay.nodes[p.index].typical_train_seconds for p in self.peers},
        }
