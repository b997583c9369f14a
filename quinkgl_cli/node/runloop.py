"""The daemon's round loop: a `Node` driven in real time on an asyncio loop.

Round cadence (`--gossip-interval T`): a round starts every T seconds, or at once when the previous one ran over.
In a round: train in a worker thread (the loop keeps serving the network), then for each gossip step share the
model and wait for updates until that step's deadline or until every known peer has sent one for this round,
whichever comes first, then aggregate; then evaluate the aggregated model (worker thread). Before a round, when
peers lag (`Node.pace_plan`), the loop waits, bounded, until their updates come closer: without it a faster peer
runs ever further ahead and drops everything the slower one sends as stale. A round whose training ran past its
deadlines still waits a little for each step (`min_gossip_wait`): without it, it would aggregate only the
previous round's updates. After the last round: the node's final consensus exchanges.

Owns the waiting (`Waiter`: the stop request and the wake-up on arrivals), the start-up and first-round timing,
the reminders it prints at most every `REMINDER_S` seconds (loop time), and the final consensus's evaluation.
Every wait reads the event loop's clock, and the CPU-heavy steps run through `Work`: the daemon's loop runs in real
time with training and evaluation in a worker thread; the simulator's field driver (`quinkgl_cli.sim.field`) runs
this same loop for every peer on one virtual-time event loop, training in place and charged a modelled duration.
After each round it asks its `SplitWatch` whether the swarm fell apart (and has it reconnect).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quinkgl_cli.events import emit
from quinkgl_cli.node.core import Node, RoundMetrics, evaluate_merged
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.node.options import ScheduleOptions
from quinkgl_cli.node.splitwatch import SplitWatch

log = logging.getLogger("quinkgl.daemon")

REMINDER_S = 30.0  # how often a peer with no peers (or behind schedule, or pacing) says so
# A late round still waits this share of the interval (at most the cap) across its gossip steps for peers' updates.
MIN_GOSSIP_WAIT_FRACTION = 0.25
MIN_GOSSIP_WAIT_CAP_S = 5.0


def min_gossip_wait(interval: float, steps: int) -> float:
    """The least time one gossip step waits for updates, even when the round is already past its deadline."""
    return min(MIN_GOSSIP_WAIT_FRACTION * interval, MIN_GOSSIP_WAIT_CAP_S) / max(steps, 1)


@dataclass(frozen=True)
class Work:
    """How the loop runs a node's CPU-heavy steps (each given as a no-argument call): by default in a worker thread,
    so that the network stays served while the node trains."""

    train: Callable[[Callable[[], Any]], Awaitable[Any]] = asyncio.to_thread
    evaluate: Callable[[Callable[[], Any]], Awaitable[Any]] = asyncio.to_thread


class Waiter:
    """Sleeps of the round loop that end early on a stop request or, when asked, on an update's arrival."""

    def __init__(self) -> None:
        self.stop_event = asyncio.Event()
        self.inbox_event = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    async def sleep_until(self, deadline: float, until: Callable[[], bool] | None = None) -> None:
        """Sleep until ``deadline`` (loop time), a stop request, or ``until()`` turning true (checked on arrivals)."""
        loop = asyncio.get_running_loop()
        while not self.stop_event.is_set():
            if until is not None and until():
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            self.inbox_event.clear()
            waiters = [asyncio.ensure_future(self.stop_event.wait())]
            if until is not None:
                waiters.append(asyncio.ensure_future(self.inbox_event.wait()))
            try:
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()


class RoundLoop:
    """Runs rounds until the node is finished or a stop is requested; ``after_round`` saves each round's state."""

    def __init__(self, node: Node, schedule: ScheduleOptions, waiter: Waiter, context: LogContext,
                 bootstrap: list[str], started_at: float,
                 after_round: Callable[[RoundMetrics], Awaitable[None]],
                 may_continue: Callable[[], bool] = lambda: True, work: Work = Work()) -> None:
        self.node = node
        self.work = work
        self.may_continue = may_continue  # asked before every round (the daemon checks the manifest's expiry)
        self.schedule = schedule
        self.waiter = waiter
        self.context = context
        self.bootstrap = bootstrap
        self.started_at = started_at
        self.after_round = after_round
        self.first_round_at: float | None = None
        self.final_eval: dict[str, Any] | None = None  # evaluation metrics after final consensus, if any
        self._noted: dict[str, float] = {}  # reminder -> when last printed
        self.split = SplitWatch(node, bootstrap)  # says when the swarm falls apart, and reconnects

    def _due(self, reminder: str) -> bool:
        now = asyncio.get_running_loop().time()
        if now - self._noted.get(reminder, -1e9) < REMINDER_S:
            return False
        self._noted[reminder] = now
        return True

    def ready_peers(self, want: int) -> int:
        """The peers that count towards ``want``. Fresh keys cost nothing, so once the operator named at least
        ``want`` peers (seeds, rendezvous entries) only trusted ones count (`PeerInfo.trusted`): a crowd of strangers
        must not start our rounds before the peers we learn with are here. With fewer named, peers can only meet
        through introductions, and any peer counts."""
        transport = self.node.transport
        peers = transport.peers()
        return sum(p.trusted for p in peers) if transport.named_peers() >= want else len(peers)

    async def wait_for_peers(self, want: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_note = loop.time()
        while (have := self.ready_peers(want)) < want and not self.waiter.stopping:
            now = loop.time()
            if now >= deadline:
                emit(log, logging.WARNING, "min-peers-timeout", have=have, want=want, seconds=round(timeout),
                     note="starting anyway")
                return
            if now >= next_note:
                emit(log, logging.INFO, "waiting-for-peers", have=have, want=want)
                next_note = now + 5.0
            await self.waiter.sleep_until(min(deadline, now + 0.05))
        if not self.waiter.stopping:  # a stop while waiting found no peers ready: the stop lines say what happened
            emit(log, logging.INFO, "peers-ready", have=have, want=want)

    async def rounds(self) -> None:
        loop = asyncio.get_running_loop()
        node, waiter = self.node, self.waiter
        interval = self.schedule.gossip_interval
        next_start = loop.time()
        while not node.finished() and not waiter.stopping:
            await waiter.sleep_until(next_start)
            await self.pace()
            if waiter.stopping or not self.may_continue():
                return
            round_start = loop.time()
            next_start = round_start + interval
            node.begin_round()
            self.context.round = node.round
            if self.first_round_at is None:
                self.first_round_at = time.monotonic()
                # From the process's start: what a user waits for after launching `quinkgl run`.
                emit(log, logging.INFO, "first-round", seconds_since_start=round(self.first_round_at - self.started_at, 3))
            await self.work.train(node.train_round)
            if waiter.stopping:
                return
            if not node.known_peers:
                self._note_alone()
                # Shared with no one, its trained model would otherwise not reach the served mean: a deserted peer
                # served its last shared model's mean for up to `serving.MAX_AGE` rounds while it trained on.
                node.note_trained()
            steps = node.gossip_steps
            train_end = loop.time()
            least = min_gossip_wait(interval, steps)
            for step in range(steps):
                step_deadline = train_end + (next_start - train_end) * (step + 1) / steps
                if node.known_peers:
                    node.share(step)
                    # Past the deadline (training ran over), peers still get a moment to answer this round.
                    await waiter.sleep_until(max(step_deadline, loop.time() + least), until=node.has_fresh_update_from_all)
                if waiter.stopping:
                    return
                outcome = node.aggregate()
                if outcome is None and node.known_peers:
                    emit(log, logging.DEBUG, "no-updates", known=len(node.known_peers))
            await self.work.evaluate(node.evaluate)
            metrics = node.end_round()
            self.split.check(node.round)
            await self.after_round(metrics)
            if loop.time() > next_start and self._due("behind-schedule"):
                emit(log, logging.INFO, "behind-schedule", round_seconds=round(metrics.duration, 2),
                     train_seconds=round(metrics.train_time, 2), interval=round(interval, 2),
                     hint="rounds start back to back; raise --gossip-interval or lower --local-epochs/--local-steps")

    def _note_alone(self) -> None:
        if self._due("alone"):
            hint = "no peers found yet, training locally"
            emit(log, logging.INFO, "alone", bootstrap=self.bootstrap or "none",
                 hint=hint if self.bootstrap else f"{hint}; pass --bootstrap-peer HOST:PORT")

    async def pace(self) -> None:
        """Bounded staleness: wait until lagging peers' updates come within ``pace_lag`` rounds of ours again.

        How long is the node's decision (`Node.pace_plan`); each observed lag costs at most one wait, and after a
        wait some peer did not catch up within, nobody is waited for for a while (`Node.forget_lagging`): a peer
        that stopped sending, or keys that claim old rounds on purpose, cannot hold this node back round after round.
        """
        node = self.node
        plan = node.pace_plan(self.schedule.gossip_interval)
        if plan is None:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.waiter.sleep_until(started + plan.patience, until=lambda: not node.lagging_peers())
        still = node.lagging_peers()
        node.forget_lagging(timed_out=still)
        lagging = plan.lagging
        if self._due("pacing"):
            emit(log, logging.INFO, "pacing", peers=sorted(lagging), lag=max(lagging.values()),
                 max_staleness=node.max_staleness,
                 hint="slower peers lag; waiting for them keeps their updates usable (a longer --gossip-interval avoids it)")
        emit(log, logging.DEBUG, "paced", peers=sorted(lagging), lag=max(lagging.values()),
             patience_s=round(plan.patience, 3), waited_s=round(loop.time() - started, 3), caught_up=not still)

    async def final_consensus(self) -> None:
        """The node's averaging-only exchanges after its last round (`Node.begin_consensus`), then its evaluation."""
        loop = asyncio.get_running_loop()
        node = self.node
        if not node.known_peers:
            emit(log, logging.INFO, "final-consensus-skipped", reason="no-peers")
            return
        done = 0
        for step in node.begin_consensus():
            if self.waiter.stopping:
                return
            if not node.known_peers:
                # The others finished their merge and left (this peer ran a round behind): the model it holds now is
                # its final model, so it is evaluated as such; the finished line used to report the last round's
                # served model instead.
                break
            node.share(step)
            await self.waiter.sleep_until(loop.time() + self.schedule.gossip_interval, until=node.has_fresh_update_from_all)
            node.aggregate()
            done += 1
        await self.work.evaluate(lambda: evaluate_merged(node))
        metrics = node.end_consensus()
        self.final_eval = {"val_loss": metrics.val_loss, "val_accuracy": metrics.val_accuracy, **metrics.personal_fields()}
        short = {} if done == node.final_consensus_steps else {"of": node.final_consensus_steps, "cut_short": "peers-left"}
        emit(log, logging.INFO, "final-consensus", steps=done, **short, **self.final_eval)
