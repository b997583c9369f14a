"""`quinkgl run`: the peer daemon, driving a `Node` in real time on an asyncio loop.

Start-up, in order, each failure a one-line error with its exit code (`prepare`):
  1. manifest loaded and trusted under the policy (2 / 1 / 3 / 4),
  2. peer script loaded, required hooks present (2 / 7),
  3. model built, its arch hash compared with the manifest's (5 under --strict-manifest, else a warning),
  4. loaders built, 5. optimizer from ``build_optimizer(manifest, model)`` (SGD default),
  6. checkpoint directory: resume from the newest checkpoint of this swarm; another swarm's is refused (7) unless
     ``--no-resume``.
Then the transport starts inside the running loop and rounds begin.

Round cadence (`--gossip-interval T`): a round starts every T seconds, or at once when the previous one ran over.
In a round: train in a worker thread (the loop keeps serving the network), then for each gossip step share the
model and wait for updates until that step's deadline or until every known peer has sent one for this round,
whichever comes first, then aggregate; then evaluate the aggregated model (worker thread). Before a round, when a
peer's last update arrived ``max_staleness`` or more rounds behind ours (rounds run back to back and that peer is
slower), the daemon waits, bounded, until that peer's updates come closer (`_pace`): without it a faster peer runs
ever further ahead and drops everything the slower one sends as stale. A round whose training
ran past its deadlines still waits a little for each step (`min_gossip_wait`): without it, it would aggregate only
the previous round's updates. After the round: metrics, ``on_round_end``, the end-of-round snapshot (model,
optimizer, RNG, history; encoded on the loop), written off the loop every ``--checkpoint-every`` rounds.

After the last round: ``final_consensus_steps`` averaging-only exchanges, a checkpoint marked final, the final model,
one summary line, exit 0. Started again on that finished checkpoint (same or lower round target), the daemon says
``already-finished`` and exits 0 without training or touching the final model (it writes it only if it is missing).

SIGTERM / SIGINT: training stops at the next batch and the round in progress is abandoned: the checkpoint on disk
is the end-of-round state of the last completed round (written now when ``--checkpoint-every`` had skipped it), so
a resumed daemon runs that round again from the state it started from; the final model file gets the model the
peer serves (`quinkgl_cli.node.serving`). The transport stops, exit 130. Any other
failure of the loop is logged with its traceback and exits non-zero; nothing is saved then (the model may be what
broke).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import ExitCode, NodeConfigError, QuinkglError, UsageError
from quinkgl_cli.node.logs import LogContext, kv, setup_logging

_IMPORTED_AT = time.monotonic()
log = logging.getLogger("quinkgl.daemon")

DEFAULT_GOSSIP_INTERVAL = 10.0
LONE_REMINDER_S = 30.0  # how often a peer with no peers says so
STOP_GRACE_S = 5.0
# A late round still waits this share of the interval (at most the cap) across its gossip steps for peers' updates.
MIN_GOSSIP_WAIT_FRACTION = 0.25
MIN_GOSSIP_WAIT_CAP_S = 5.0


def min_gossip_wait(interval: float, steps: int) -> float:
    """The least time one gossip step waits for updates, even when the round is already past its deadline."""
    return min(MIN_GOSSIP_WAIT_FRACTION * interval, MIN_GOSSIP_WAIT_CAP_S) / max(steps, 1)


def process_started_at() -> float:
    """This process's start as a `time.monotonic()` value, so start-up times include the interpreter and imports.

    From /proc/self/stat (start time in clock ticks since boot); where there is none, the import of this module.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22; fields after ")" start at 3
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    return time.monotonic() - max(age, 0.0)


@dataclass(frozen=True)
class Snapshot:
    """A node's state encoded as checkpoint bytes at one moment (the end of a round, or the end of the run)."""

    round: int
    data: bytes
    encode_seconds: float


@dataclass
class DaemonOptions:
    manifest: Path
    script: Path
    node_id: str
    port: int = 0
    listen: str = "127.0.0.1"
    rounds: int | None = None
    gossip_interval: float = DEFAULT_GOSSIP_INTERVAL
    trust_policy: str | None = None
    trusted_pubkeys: list[str] = field(default_factory=list)
    script_args: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    bootstrap_peers: list[str] = field(default_factory=list)
    strict_manifest: bool = True
    resume: bool = True
    log_format: str = "text"
    log_level: str = "info"
    dry_run: bool = False
    state_dir: Path | None = None
    local_epochs: int | None = None
    local_steps: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    seed: int | None = None
    final_model: Path | None = None
    torch_threads: int | None = None
    min_peers: int = 0  # wait (up to min_peers_timeout) until this many peers are known before round 1
    min_peers_timeout: float = 60.0
    transport_options: dict[str, Any] = field(default_factory=dict)  # discovery switches of the IPv8 transport


@dataclass
class Prepared:
    options: DaemonOptions
    trusted: Any  # quinkgl_cli.manifest.trust.TrustedManifest
    script: Any  # PeerScript
    model: Any
    arch_hash: str
    train_loader: Any
    val_loader: Any
    optimizer: Any
    checkpoint_dir: Path
    resume_state: Any | None  # NodeState
    resume_file: Path | None
    seed: int
    locks: list[Any] = field(default_factory=list)  # held for the process's life (node/dirlock.py)


def default_checkpoint_dir(options: DaemonOptions, swarm_id: str) -> Path:
    """``$QUINKGL_HOME/checkpoints/<first 12 hex of the swarm id>/<node id>``: one directory per swarm and node, so
    the same node id in another swarm neither resumes nor is refused by the wrong checkpoint."""
    from quinkgl_cli.paths import state_home

    return state_home(options.state_dir) / "checkpoints" / swarm_id.removeprefix("sha256:")[:12] / options.node_id


def _swarm_seed(swarm_id: str) -> int:
    # Every peer of a swarm starts from the same initial weights unless --seed says otherwise: averaging models
    # that began from one point works far better than averaging unrelated random initialisations.
    return int.from_bytes(hashlib.sha256(swarm_id.encode()).digest()[:4], "big")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare(options: DaemonOptions) -> Prepared:
    """The start-up checks, in the documented order. Raises QuinkglError subclasses."""
    from quinkgl_cli.manifest.trust import load_trusted

    trusted = load_trusted(options.manifest, options.trust_policy, tuple(options.trusted_pubkeys), options.state_dir)
    manifest = trusted.manifest

    from quinkgl_cli.node.script import load_script

    script = load_script(options.script)

    import torch

    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    seed = options.seed if options.seed is not None else _swarm_seed(trusted.swarm_id)
    seed_everything(seed)
    model = script.build_model(manifest, **options.script_args)

    from quinkgl_cli.manifest.arch_hash import compute_arch_hash

    arch_hash = compute_arch_hash(model)
    if arch_hash != manifest.model.arch_hash:
        if options.strict_manifest:
            from quinkgl_cli.errors import ArchMismatch

            raise ArchMismatch(
                f"model from {Path(options.script).name} has arch hash {arch_hash}, the manifest requires {manifest.model.arch_hash}",
                "use the script the manifest was made for, or create a new manifest (--strict-manifest false only warns)",
            )
        log.warning("arch-mismatch %s", kv(model=arch_hash, manifest=manifest.model.arch_hash, strict="false"))

    train_loader, val_loader = script.build_loaders(manifest, **options.script_args)
    optimizer = script.build_optimizer(manifest, model)

    checkpoint_dir = Path(options.checkpoint_dir) if options.checkpoint_dir else default_checkpoint_dir(options, trusted.swarm_id)
    resume_state = None
    resume_file = None
    locks = [] if options.dry_run else lock_node_dirs(options, checkpoint_dir)
    if options.resume and not options.dry_run:
        from quinkgl_cli.node.checkpoint import CheckpointStore

        found = CheckpointStore(checkpoint_dir, keep=options.keep_checkpoints).latest()
        if found is not None:
            ckpt, state = found
            if state.meta.get("swarm_id") != trusted.swarm_id:
                raise NodeConfigError(
                    f"checkpoint {ckpt.path} belongs to swarm {state.meta.get('swarm_id')}, not {trusted.swarm_id}",
                    "pass --no-resume to start this swarm afresh, or another --checkpoint-dir",
                )
            resume_state, resume_file = state, ckpt.path
    return Prepared(options, trusted, script, model, arch_hash, train_loader, val_loader, optimizer, checkpoint_dir,
                    resume_state, resume_file, seed, locks)


def node_state_dir(options: DaemonOptions) -> Path:
    """The node's own state (its IPv8 identity key): one per node id, so several peers on one machine never share
    a key."""
    from quinkgl_cli.paths import state_home

    return state_home(options.state_dir) / "nodes" / options.node_id


def lock_node_dirs(options: DaemonOptions, checkpoint_dir: Path) -> list[Any]:
    """One daemon per checkpoint directory and per node identity, or the second is refused (7)."""
    from quinkgl_cli.node.dirlock import lock_directory

    return [
        lock_directory(checkpoint_dir, "checkpoint directory", "stop the other daemon, or give this one its own --checkpoint-dir"),
        lock_directory(node_state_dir(options), "node state directory",
                       f"another daemon runs as --node-id {options.node_id}; give each peer its own --node-id"),
    ]


def make_ipv8_transport(prepared: Prepared) -> Any:
    from quinkgl_cli import wire
    from quinkgl_cli.tensors import shared_specs
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    o = prepared.options
    bootstrap = list(dict.fromkeys([*o.bootstrap_peers, *prepared.trusted.manifest.bootstrap_peers]))
    return IPv8Transport(
        node_id=o.node_id,
        swarm_id=prepared.trusted.swarm_id,
        arch_hash=prepared.trusted.manifest.model.arch_hash,
        state_dir=node_state_dir(o),
        listen_host=o.listen,
        port=o.port,
        bootstrap=bootstrap,
        # Refuse offers far larger than this model can ever be: a peer cannot make us buffer gigabytes.
        max_model_bytes=wire.max_blob_bytes(shared_specs(prepared.model)) * 2,
        **o.transport_options,
    )


class Daemon:
    """One running peer: the node, its transport, the round clock and the checkpoint store."""

    def __init__(self, prepared: Prepared, context: LogContext, transport_factory: Callable[[Prepared], Any]) -> None:
        from quinkgl_cli.node.checkpoint import CheckpointStore
        from quinkgl_cli.node.core import Node, NodeConfig

        self.prepared = prepared
        o = prepared.options
        self.options = o
        self.context = context
        self.transport = transport_factory(prepared)
        self.train_stop = threading.Event()
        manifest = prepared.trusted.manifest
        node_seed = prepared.seed ^ int.from_bytes(hashlib.sha256(o.node_id.encode()).digest()[:4], "big")
        self.node = Node(
            NodeConfig(o.node_id, rounds=o.rounds, local_epochs=o.local_epochs, local_steps=o.local_steps, seed=node_seed),
            manifest,
            prepared.trusted.swarm_id,
            prepared.model,
            prepared.train_loader,
            prepared.val_loader,
            prepared.optimizer,
            self.transport,
            hooks=prepared.script,
            clock=time.monotonic,
            loss_fn=getattr(prepared.script.module, "loss_fn", None) if callable(getattr(prepared.script.module, "loss_fn", None)) else None,
        )
        self.store = CheckpointStore(prepared.checkpoint_dir, keep=o.keep_checkpoints)
        self.stop_event = asyncio.Event()
        self.inbox_event = asyncio.Event()
        self.node.trainer.stop_flag = self.train_stop
        self.stop_signal: str | None = None
        self._last_alone_note = -1e9
        self._last_overrun_note = -1e9
        self._last_pace_note = -1e9
        self.started_at = process_started_at()
        self.first_round_at: float | None = None
        self.final_eval: tuple[float | None, float | None] | None = None  # after final consensus, if any
        # The last completed round's snapshot while it is not on disk (--checkpoint-every skipped it): what a stop
        # saves. None when the newest checkpoint on disk already is that round's.
        self.unsaved: Snapshot | None = None

    # ------------------------------------------------------------------ signals
    def _request_stop(self, signame: str) -> None:
        if self.stop_signal is None:
            self.stop_signal = signame
            log.info("stopping %s", kv(signal=signame))
        self.stop_event.set()
        self.train_stop.set()

    async def _sleep_until(self, deadline: float, until: Callable[[], bool] | None = None) -> None:
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

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Transports may deliver from their own threads: wake the waiting round through the loop, safely.
        self.node.inbox.listener = lambda: loop.call_soon_threadsafe(self.inbox_event.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig.name)
        node = self.node
        o = self.options
        if self.prepared.resume_state is not None:
            try:
                node.load_state_dict(self.prepared.resume_state)
            except Exception as exc:
                raise NodeConfigError(
                    f"checkpoint {self.prepared.resume_file} does not fit this model and optimizer: {_one_line_error(exc)}",
                    "pass --no-resume to start afresh, or use the script the checkpoint was made with",
                ) from exc
            self.context.round = node.completed_round
            if node.finished() and self.prepared.resume_state.meta.get("final"):
                return await self._already_finished()
            # Stable wording that people grep for: "resumed from round N".
            log.info("resumed from round %d %s", node.completed_round, kv(checkpoint=self.prepared.resume_file))
        await self.transport.start(node)
        address = getattr(self.transport, "address", None)
        log.info("started %s", kv(
            node=o.node_id, swarm=self.prepared.trusted.swarm_id,
            listen=f"{address[0]}:{address[1]}" if address else f"{o.listen}:{o.port}",
            rounds=node.rounds if node.rounds is not None else "unlimited", interval=f"{o.gossip_interval:g}",
            strategy=self.prepared.trusted.manifest.aggregation.name, topology=self.prepared.trusted.manifest.topology.name,
        ))
        try:
            if o.min_peers and node.completed_round == 0:
                await self._wait_for_peers(o.min_peers, o.min_peers_timeout)
            await self._rounds()
            if not self.stop_event.is_set() and node.final_consensus_steps:
                await self._final_consensus()
            if self.stop_event.is_set() and self.unsaved is not None:
                # Asked to stop: the last completed round's end-of-round state, never the half-done round's.
                await self._save(self.unsaved, reason="stop")
            if self.stop_event.is_set() and node.completed_round > 0 and not node.finished():
                # A long-lived daemon (no --rounds) only ever stops this way: leave the model it serves.
                await self._write_final_model(self._final_metrics())
        finally:
            await self._stop_transport()
        if self.stop_event.is_set() and not node.finished():
            log.info("stopped %s", kv(completed_round=node.completed_round, signal=self.stop_signal,
                                      checkpoint=self._newest_checkpoint()))
            return int(ExitCode.INTERRUPTED)
        await self._finish()
        return int(ExitCode.OK)

    def _newest_checkpoint(self) -> Path | None:
        files = self.store.files()
        return files[-1].path if files else None

    async def _stop_transport(self) -> None:
        try:
            await asyncio.wait_for(self.transport.stop(), timeout=STOP_GRACE_S)
        except Exception as exc:  # stopping must not hide the run's outcome
            log.warning("transport-stop-failed %s", kv(error=f"{type(exc).__name__}: {exc}"))

    async def _wait_for_peers(self, want: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_note = loop.time()
        while len(self.node.known_peers) < want and not self.stop_event.is_set():
            now = loop.time()
            if now >= deadline:
                log.warning("min-peers-timeout %s", kv(have=len(self.node.known_peers), want=want, seconds=round(timeout),
                                                       note="starting anyway"))
                return
            if now >= next_note:
                log.info("waiting-for-peers have=%d want=%d", len(self.node.known_peers), want)
                next_note = now + 5.0
            await self._sleep_until(min(deadline, now + 0.05))
        log.info("peers-ready have=%d want=%d", len(self.node.known_peers), want)

    def _note_overrun(self, duration: float, train_time: float, interval: float) -> None:
        now = time.monotonic()
        if now - self._last_overrun_note >= LONE_REMINDER_S:
            self._last_overrun_note = now
            log.info("behind-schedule round_seconds=%.2f train_seconds=%.2f interval=%.2f "
                     "hint='rounds start back to back; raise --gossip-interval or lower --local-epochs/--local-steps'",
                     duration, train_time, interval)

    def _note_alone(self) -> None:
        now = time.monotonic()
        if now - self._last_alone_note >= LONE_REMINDER_S:
            self._last_alone_note = now
            bootstrap = self.options.bootstrap_peers or list(self.prepared.trusted.manifest.bootstrap_peers)
            hint = "no peers found yet, training locally"
            log.info("alone %s", kv(bootstrap=bootstrap or "none",
                                    hint=hint if bootstrap else f"{hint}; pass --bootstrap-peer HOST:PORT"))

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        node = self.node
        interval = self.options.gossip_interval
        next_start = loop.time()
        while not node.finished() and not self.stop_event.is_set():
            await self._sleep_until(next_start)
            await self._pace()
            if self.stop_event.is_set():
                return
            round_start = loop.time()
            next_start = round_start + interval
            node.begin_round()
            self.context.round = node.round
            if self.first_round_at is None:
                self.first_round_at = time.monotonic()
                # From the process's start: what a user waits for after launching `quinkgl run`.
                log.info("first-round seconds_since_start=%.3f", self.first_round_at - self.started_at)
            await asyncio.to_thread(node.train_round)
            if self.stop_event.is_set():
                return
            if not node.known_peers:
                self._note_alone()
            steps = node.gossip_steps
            train_end = loop.time()
            least = min_gossip_wait(interval, steps)
            for step in range(steps):
                step_deadline = train_end + (next_start - train_end) * (step + 1) / steps
                if node.known_peers:
                    node.share(step)
                    # Past the deadline (training ran over), peers still get a moment to answer this round.
                    await self._sleep_until(max(step_deadline, loop.time() + least), until=node.has_fresh_update_from_all)
                if self.stop_event.is_set():
                    return
                outcome = node.aggregate()
                if outcome is None and node.known_peers:
                    log.debug("no-updates known=%d", len(node.known_peers))
            await asyncio.to_thread(node.evaluate)
            metrics = node.end_round()
            snapshot = self._snapshot()
            if node.completed_round % self.options.checkpoint_every == 0 or node.finished():
                await self._save(snapshot, reason="round")
                self.unsaved = None
            else:
                self.unsaved = snapshot
            if loop.time() > next_start:
                self._note_overrun(metrics.duration, metrics.train_time, interval)

    async def _pace(self) -> None:
        """Bounded staleness: wait until lagging peers' updates come within ``pace_lag`` rounds of ours again.

        How long is the node's decision (`Node.pace_plan`, `quinkgl_cli.node.peerclock`); each observed lag costs
        at most one wait, and a peer that did not catch up within it is not waited for again for a while
        (`Node.forget_lagging`): a peer that stopped sending, or one that claims old rounds on purpose, cannot hold
        this node back round after round.
        """
        node = self.node
        plan = node.pace_plan(self.options.gossip_interval)
        if plan is None:
            return
        lagging, patience = plan.lagging, plan.patience
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._sleep_until(started + patience, until=lambda: not node.lagging_peers())
        still = node.lagging_peers()
        node.forget_lagging(timed_out=still)
        now = time.monotonic()
        if now - self._last_pace_note >= LONE_REMINDER_S:
            self._last_pace_note = now
            log.info("pacing %s", kv(peers=sorted(lagging), lag=max(lagging.values()), max_staleness=node.max_staleness,
                                     hint="slower peers lag; waiting for them keeps their updates usable "
                                          "(a longer --gossip-interval avoids it)"))
        log.debug("paced %s", kv(peers=sorted(lagging), lag=max(lagging.values()), patience_s=round(patience, 3),
                                 waited_s=round(loop.time() - started, 3), caught_up=not still))

    async def _final_consensus(self) -> None:
        loop = asyncio.get_running_loop()
        node = self.node
        if not node.known_peers:
            log.info("final-consensus-skipped reason=no-peers")
            return
        for step in range(node.final_consensus_steps):
            if not node.known_peers or self.stop_event.is_set():
                return
            node.share(node.gossip_steps + step)
            await self._sleep_until(loop.time() + self.options.gossip_interval, until=node.has_fresh_update_from_all)
            node.aggregate()
        val_loss, val_acc = await asyncio.to_thread(node.evaluate)
        self.final_eval = (val_loss, val_acc)
        log.info("final-consensus %s", kv(steps=node.final_consensus_steps, val_loss=val_loss, val_accuracy=val_acc))

    def _snapshot(self, final: bool = False) -> Snapshot:
        """The node's state now, serialized here on the loop (one memcpy): training may go on while it is written."""
        started = time.perf_counter()
        state = self.node.state_dict()
        if final:
            state.meta["final"] = True
            state.meta["final_metrics"] = self._final_metrics()
        return Snapshot(self.node.completed_round, self.store.encode(state), time.perf_counter() - started)

    async def _save(self, snapshot: Snapshot, reason: str) -> Path:
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.store.write, snapshot.round, snapshot.data)
        except QuinkglError as exc:
            log.error("checkpoint-failed %s", kv(error=exc.one_line()))
            raise
        log.info("checkpoint-saved %s", kv(path=path, reason=reason,
                                           seconds=round(snapshot.encode_seconds + time.perf_counter() - started, 4)),
                 extra={"round": snapshot.round})
        return path

    def _final_model_path(self) -> Path:
        from quinkgl_cli.node.checkpoint import FINAL_MODEL_NAME

        return Path(self.options.final_model or (self.prepared.checkpoint_dir / FINAL_MODEL_NAME))

    def _final_metrics(self) -> dict[str, Any]:
        last = dict(self.node.history[-1]) if self.node.history else {}
        if self.final_eval is not None:
            last["val_loss"], last["val_accuracy"] = self.final_eval
        return last

    async def _write_final_model(self, metrics: dict[str, Any]) -> Path:
        from quinkgl_cli.node.checkpoint import save_final_model

        node = self.node
        path = self._final_model_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"node_id": node.node_id, "swarm_id": node.swarm_id, "round": node.completed_round,
                "arch_hash": self.prepared.arch_hash, "metrics": metrics}
        await asyncio.to_thread(save_final_model, path, node.served_model(), meta)
        return path

    async def _already_finished(self) -> int:
        """Resumed on the final checkpoint of a run that reached its rounds: nothing to train. A restart has no
        peers yet, so finishing again would overwrite the final model with one that skipped the final consensus."""
        node = self.node
        metrics = dict(self.prepared.resume_state.meta.get("final_metrics") or {})
        path = self._final_model_path()
        restored = not path.exists()
        if restored:  # the run was killed between its final checkpoint and the final model: that is the same model
            await self._write_final_model(metrics)
        log.info("already-finished %s", kv(
            rounds=node.completed_round, val_accuracy=metrics.get("val_accuracy"),
            checkpoint=self.prepared.resume_file, final_model=path, final_model_restored=restored,
            hint="nothing to train; raise --rounds to train further, or pass --no-resume to start over"))
        return int(ExitCode.OK)

    async def _finish(self) -> None:
        node = self.node
        # The final checkpoint first: killed before the model file is written, a restart finds the run finished
        # and writes the model from it, instead of re-finishing from the last round's state without consensus.
        await self._save(self._snapshot(final=True), reason="final")
        last = self._final_metrics()
        path = await self._write_final_model(last)
        st = self.transport.stats
        log.info("finished %s", kv(
            rounds=node.completed_round, loss=last.get("loss"), val_loss=last.get("val_loss"),
            val_accuracy=last.get("val_accuracy"), peers_met=len(node.discovered), bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received, seconds=f"{time.monotonic() - self.started_at:.1f}",
            peak_rss_mb=f"{peak_rss_mb():.1f}", final_model=path,
        ))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    VmHWM where the kernel reports it: ru_maxrss survives exec on Linux, so a daemon started by a big parent
    (the demo, a benchmark) would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Keep a long-running peer's memory bounded under glibc: model-sized buffers (updates received, encoded,
    checkpointed) are mmapped and returned to the system when freed, and threads share two malloc arenas.

    glibc's default raises its mmap threshold after the first large free, so every later 4 MB buffer lands in a
    heap that never shrinks, once per thread arena; measured on a 1.1M-parameter swarm this held ~55 MB per peer
    (benchmarks/bench_daemon.py). Skipped when the user set MALLOC_* variables or libc is not glibc.
    """
    if sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(mallopt(_M_ARENA_MAX, 2))


def run_daemon(options: DaemonOptions, transport_factory: Callable[[Prepared], Any] | None = None) -> int:
    """Everything `quinkgl run` does; returns the exit code. QuinkglError from start-up propagates to the CLI."""
    tune_allocator()
    level = getattr(logging, options.log_level.upper(), None)
    if not isinstance(level, int):
        raise UsageError(f"--log-level {options.log_level!r} is not one of debug, info, warning, error")
    context = setup_logging(options.node_id, options.log_format, level)
    prepared = prepare(options)
    if options.dry_run:
        m = prepared.trusted.manifest
        log.info("dry-run-ok %s", kv(
            manifest=m.name, swarm=prepared.trusted.swarm_id, policy=prepared.trusted.policy,
            arch_hash=prepared.arch_hash, arch_match=prepared.arch_hash == m.model.arch_hash,
            params=sum(p.numel() for p in prepared.model.parameters()), train_batches=_len_or_dash(prepared.train_loader),
            optimizer=type(prepared.optimizer).__name__, strategy=m.aggregation.name, topology=m.topology.name,
        ))
        return int(ExitCode.OK)
    daemon = Daemon(prepared, context, transport_factory or make_ipv8_transport)
    try:
        return asyncio.run(daemon.run())
    except QuinkglError:
        raise
    except Exception:
        log.critical("loop-died error=%s", _one_line_error(sys.exc_info()[1]), exc_info=True)
        return int(ExitCode.NODE)


def _one_line_error(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines() if exc is not None else []
    return repr(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)


def _len_or_dash(loader: Any) -> str:
    try:
        return str(len(loader))
    except TypeError:
        return "-"


def default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "peer"
