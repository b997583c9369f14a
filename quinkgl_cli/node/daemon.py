"""`quinkgl run`: the peer daemon. Start-up (`quinkgl_cli.node.startup`), then a `Node` wired by
`quinkgl_cli.node.wiring`, driven in real time by the round loop (`quinkgl_cli.node.runloop`), its state written by
`quinkgl_cli.node.persistence`.

After the last round: ``final_consensus_steps`` averaging-only exchanges, a checkpoint marked final, the final model,
one summary line, exit 0. Started again on that finished checkpoint (same or lower round target), the daemon says
``already-finished`` and exits 0 without training or touching the final model (it writes it only if it is missing).
Resumed from a stopped run's checkpoint at or past the round target (``--rounds`` lowered), it trains no round:
``rounds-reached`` says so, and the run finishes at the checkpoint's round (``finished rounds=`` that round).

``--trace FILE`` (`quinkgl_cli.node.tracer`): the file is checked when the daemon is built and a session appended
as it runs: node start and stop (with why), each round's training, every model transfer, peers coming and going.

SIGTERM / SIGINT / SIGHUP (a closed terminal; not when inherited ignored, as under ``nohup``): training stops at the next batch and the round in progress is abandoned: the checkpoint on disk
is the end-of-round state of the last completed round (written now when ``--checkpoint-every`` had skipped it), so
a resumed daemon runs that round again from the state it started from, and the final model file gets the model the
peer serves (`quinkgl_cli.node.serving`). The transport stops, exit 130. A manifest
whose ``expires_at`` passes during the run stops the daemon the same way before the next round (``manifest-expired``),
exit 4; so does this node's certificate expiring (``certificate-expired``) or its key being revoked (``key-revoked``:
the transport adopted a revocation list naming it). Any other
failure of the loop is logged with its traceback and exits non-zero; nothing is saved then (the model may be what
broke). A start-up that fails before the first round (a port in use, say) gives back the directories it took,
removing those it created empty.

Owns the process-level pieces of one running peer: the transport, the stop signal, and the order of the phases.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli.errors import ExitCode, NodeConfigError, QuinkglError, TrustError, UsageError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest.trust import check_expiry
from quinkgl_cli.node.admission import check_certificate_expiry
from quinkgl_cli.node.classes import task_class_count
from quinkgl_cli.node.core import NodeConfig, NodeState, RoundMetrics
from quinkgl_cli.node.logs import LogContext, setup_logging
from quinkgl_cli.node.lrschedule import left_out
from quinkgl_cli.node.nodelog import one_line
from quinkgl_cli.node.observed import SnapshotMaker
from quinkgl_cli.node.options import DaemonOptions, default_node_id
from quinkgl_cli.node.persistence import RunFiles
from quinkgl_cli.node.personal import build_personal
from quinkgl_cli.node.probe import probe_batches
from quinkgl_cli.node.process import process_started_at, stop_signals, tune_allocator
from quinkgl_cli.node.runloop import RoundLoop, Waiter
from quinkgl_cli.node.startup import Prepared, make_ipv8_transport, node_seed, prepare
from quinkgl_cli.node.tracer import TracedEvents, Tracer
from quinkgl_cli.node.trainer import default_loss
from quinkgl_cli.node.wiring import build_node
from quinkgl_cli.ops.observer import open_observer
from quinkgl_cli.ops.snapshot import Observer

log = logging.getLogger("quinkgl.daemon")

# What `quinkgl run` and tests import from here.
__all__ = ["Daemon", "DaemonOptions", "Prepared", "default_node_id", "make_ipv8_transport", "prepare", "run_daemon"]

STOP_GRACE_S = 5.0
_STOP_REASONS: dict[int, str] = {int(ExitCode.OK): "finished", int(ExitCode.INTERRUPTED): "signal", int(ExitCode.TRUST): "expired"}


class Daemon:
    """One running peer: the node, its transport, the round loop and the files it writes."""

    def __init__(self, prepared: Prepared, context: LogContext, transport_factory: Callable[[Prepared], Any],
                 observer: Observer | None = None) -> None:
        o = prepared.options
        self.prepared = prepared
        self.options = o
        self.context = context
        self.transport = transport_factory(prepared)
        self.train_stop = threading.Event()
        schedule = o.schedule
        config = NodeConfig(o.node_id, rounds=schedule.rounds, local_epochs=schedule.local_epochs,
                            local_steps=schedule.local_steps, seed=node_seed(prepared.seed, o.node_id))
        self.node = build_node(prepared.script, prepared.trusted.manifest, prepared.trusted.swarm_id, config,
                               prepared.model, prepared.train_loader, prepared.val_loader, self.transport,
                               hooks=prepared.script, clock=time.monotonic, own_loader=prepared.own_loader)
        self.node.trainer.stop_flag = self.train_stop
        self.files = RunFiles(self.node, prepared)
        self.waiter = Waiter()
        self.stop_signal: str | None = None
        self.started_at = process_started_at()
        bootstrap = o.network.bootstrap_peers or list(prepared.trusted.manifest.bootstrap_peers)
        # The manifest's expires_at is checked against this clock before every round (tests move it).
        self.utc_now: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.expired: tuple[str, TrustError] | None = None  # (event, error) once the manifest or certificate expired
        self.loop = RoundLoop(self.node, schedule, self.waiter, context, bootstrap, self.started_at,
                              self._after_round, may_continue=self._manifest_valid)
        self.observer = observer  # told the state at start, after each round, on a stop request and at the end
        self.observed: SnapshotMaker | None = None  # once the transport listens
        self.tracer: Tracer | None = None
        if o.trace is not None:
            self.tracer = Tracer.open(o.trace, prepared.trusted.swarm_id, o.node_id, torch.get_num_threads())
            self.transport.on_transfer = self.tracer.transfer

    def _publish(self, state: str) -> None:
        if self.observer is not None and self.observed is not None:
            self.observer.update(self.observed(state))

    async def _after_round(self, metrics: RoundMetrics) -> None:
        started = time.monotonic()
        await self.files.after_round(metrics)
        self._publish("running")
        if self.tracer is not None:
            self.tracer.round_trained(metrics, time.monotonic() - started)

    def _request_stop(self, signame: str) -> None:
        if self.stop_signal is None:
            self.stop_signal = signame
            emit(log, logging.INFO, "stopping", signal=signame)
            self._publish("stopping")
        else:  # a second Ctrl-C otherwise met silence while a long batch or the transport's goodbye finished
            emit(log, logging.INFO, "still-stopping", signal=signame,
                 hint="ending the batch in progress and saving; SIGKILL stops at once, keeping the last round's checkpoint")
        self.waiter.stop_event.set()
        self.train_stop.set()

    def _manifest_valid(self) -> bool:
        """False (and the run stops as on a signal, exit 4) once the manifest's ``expires_at`` has passed, or this
        node's certificate's, or the transport learnt that this node's key is revoked: a peer must not train on in
        a swarm its creator ended or no longer admits it to. The last completed round's checkpoint is kept."""
        event = "manifest-expired"
        try:
            now = self.utc_now()
            check_expiry(self.prepared.trusted.manifest, now)
            event = "certificate-expired"
            if self.prepared.admission is not None:
                check_certificate_expiry(self.prepared.admission, now)
            event = "key-revoked"
            if self.transport.revoked():
                raise TrustError("this node's key is on the swarm's revocation list: its peers refuse it",
                                 "ask the swarm's creator; a new key needs a new certificate (certified swarms)")
        except TrustError as exc:
            self.expired = (event, exc)
            emit(log, logging.WARNING, event, error=exc.message, hint=exc.hint)
            self.waiter.stop_event.set()
            self.train_stop.set()
            return False
        return True

    def _resume(self, state: NodeState) -> None:
        try:
            self.node.load_state_dict(state)
        except Exception as exc:
            raise NodeConfigError(
                f"checkpoint {self.prepared.resume_file} does not fit this model and optimizer: {one_line(exc)}",
                "pass --no-resume to start afresh, or use the script the checkpoint was made with",
            ) from exc
        self.context.round = self.node.completed_round

    async def run(self) -> int:
        """The whole run; its exit code. With a trace, its session ends with the node's stop and why."""
        if self.tracer is None:
            return await self._run()
        try:
            code = await self._run()
        except BaseException:
            try:
                self.tracer.node_stopped(self.node.completed_round, "error")
            except QuinkglError as trace_exc:  # the run's own failure is the one to report; this one is logged
                emit(log, logging.ERROR, "trace-failed", error=trace_exc.message)
            raise
        self.tracer.node_stopped(self.node.completed_round, _STOP_REASONS.get(code, "error"))
        return code

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        # Transports may deliver from their own threads: wake the waiting round through the loop, safely.
        self.node.inbox.listener = lambda: loop.call_soon_threadsafe(self.waiter.inbox_event.set)
        for sig in stop_signals():
            loop.add_signal_handler(sig, self._request_stop, sig.name)
        node, o, resumed = self.node, self.options, self.prepared.resume_state
        if resumed is not None:
            self._resume(resumed)
            if node.finished() and resumed.meta.get("final"):
                await self.files.already_finished()
                return int(ExitCode.OK)
            # "resumed from" stays grep-able: the line reads ``resumed from_round=N checkpoint=...``.
            emit(log, logging.INFO, "resumed", from_round=node.completed_round, checkpoint=self.prepared.resume_file)
        await self.transport.start(node if self.tracer is None else TracedEvents(node, self.tracer))
        address = getattr(self.transport, "address", None)
        manifest = self.prepared.trusted.manifest
        listen = f"{address[0]}:{address[1]}" if address else f"{o.network.listen}:{o.network.port}"
        self.observed = SnapshotMaker(node, self.transport, manifest.name, listen)
        waiting = bool(o.schedule.min_peers) and node.completed_round == 0
        self._publish("waiting" if waiting else "running")  # waiting: for --min-peers, before round 1
        if o.schedule.rounds is not None and node.rounds is not None and o.schedule.rounds > node.rounds:
            emit(log, logging.WARNING, "rounds-capped", asked=o.schedule.rounds, round_limit=node.rounds,
                 hint="the manifest's round_limit is the swarm's maximum; --rounds may ask for fewer, never more")
        if resumed is not None and node.finished():  # a target lowered below a stopped run's rounds: ends it here
            emit(log, logging.WARNING, "rounds-reached", completed_round=node.completed_round, rounds=node.rounds,
                 hint=f"no round trains: the run finishes at round {node.completed_round} (final consensus, final "
                      "model); raise --rounds to train further")
        # The node id is the line's own ``node`` (a reserved member), not a field of its own.
        emit(log, logging.INFO, "started", swarm=self.prepared.trusted.swarm_id, listen=listen,
             rounds=node.rounds if node.rounds is not None else "unlimited",
             interval=o.schedule.gossip_interval, strategy=manifest.aggregation.name,
             topology=manifest.topology.name)
        stopped_model: Path | None = None
        try:
            if waiting:
                await self.loop.wait_for_peers(o.schedule.min_peers, o.schedule.min_peers_timeout)
                if not self.waiter.stopping:
                    self._publish("running")
            if self.tracer is not None and not self.waiter.stopping:
                # When its rounds begin (after --min-peers): what a replay must start the node at.
                self.tracer.node_started(node.completed_round)
            await self.loop.rounds()
            if not self.waiter.stopping and node.final_consensus_steps:
                await self.loop.final_consensus()
            if self.waiter.stopping:
                await self.files.save_unsaved()
                stopped_model = await self.files.write_stopped_model()
        finally:
            await self._stop_transport()
        if self.expired is not None:
            emit(log, logging.WARNING, "stopped", completed_round=node.completed_round, reason=self.expired[0],
                 checkpoint=self.files.newest_checkpoint(), final_model=stopped_model)
            return int(ExitCode.TRUST)
        if self.waiter.stopping and not node.finished():
            emit(log, logging.INFO, "stopped", completed_round=node.completed_round, signal=self.stop_signal,
                 checkpoint=self.files.newest_checkpoint(), final_model=stopped_model)
            return int(ExitCode.INTERRUPTED)
        await self.files.finish(self.loop.final_eval, self.started_at)
        self._publish("finished")
        return int(ExitCode.OK)

    async def _stop_transport(self) -> None:
        try:
            await asyncio.wait_for(self.transport.stop(), timeout=STOP_GRACE_S)
        except Exception as exc:  # stopping must not hide the run's outcome
            emit(log, logging.WARNING, "transport-stop-failed", error=f"{type(exc).__name__}: {exc}")


def run_daemon(options: DaemonOptions, transport_factory: Callable[[Prepared], Any] | None = None) -> int:
    """Everything `quinkgl run` does; returns the exit code. QuinkglError from start-up propagates to the CLI."""
    tune_allocator()
    level = getattr(logging, options.log_level.upper(), None)
    if not isinstance(level, int):
        raise UsageError(f"--log-level {options.log_level!r} is not one of debug, info, warning, error")
    context = setup_logging(options.node_id, options.log_format, level, log_file=options.log_file,
                            log_max_bytes=options.log_max_bytes, log_backups=options.log_backups)
    if options.dry_run:
        # Not even the bytecode cache Python writes beside the peer script (and what it imports) on first import.
        writes_bytecode = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        try:
            _dry_run(prepare(options))
        finally:
            sys.dont_write_bytecode = writes_bytecode
        return int(ExitCode.OK)
    prepared = prepare(options)
    daemon: Daemon | None = None
    observer: Observer | None = None
    try:
        observer = open_observer(options.ops, options.state_dir, options.node_id)
        daemon = Daemon(prepared, context, transport_factory or make_ipv8_transport, observer)
        return asyncio.run(daemon.run())
    except (QuinkglError, KeyboardInterrupt):  # a stop signal before the loop's handlers (`cli.run`) too
        if daemon is None or daemon.loop.first_round_at is None:
            prepared.abandon_directories()
        raise
    except Exception as exc:
        emit(log, logging.CRITICAL, "loop-died", error=one_line(exc), exc_info=exc)
        return int(ExitCode.NODE)
    finally:
        if observer is not None:
            observer.close()


def _dry_run(prepared: Prepared) -> None:
    """What a run would start with, checked and logged: the optimizer, the personalization split, and the first
    batch of each loader through the model and its loss (`node.probe`); nothing is written (no TOFU entry,
    checkpoint, key or output file). Under tofu, ``tofu=would-pin`` says that a real run would remember the creator key."""
    trusted = prepared.trusted
    m = trusted.manifest
    optimizer, scheduler = prepared.script.build_training(m, prepared.model)  # checked as the node will build it
    if (unstepped := left_out(prepared.model, optimizer)) is not None:
        emit(log, logging.WARNING, "optimizer-leaves-out", **unstepped)
    personal = build_personal(m.personalization, prepared.model, lambda local: prepared.script.build_training(m, local))
    probed = probe_batches(prepared.model, prepared.script.loss_fn or default_loss(m), tuple(m.task.input_shape),
                           {"train": prepared.train_loader, "val": prepared.val_loader, "own": prepared.own_loader},
                           task_class_count(m.task.type, tuple(m.task.output_shape)))
    for shape, names in probed.shape_mismatches(tuple(m.task.input_shape)).items():
        emit(log, logging.WARNING, "input-shape-mismatch", manifest=list(m.task.input_shape), batch=list(shape),
             loaders=names)
    tofu: dict[str, Any] = {}
    if trusted.tofu == "first-use":
        tofu = {"tofu": "would-pin", "creator": m.creator_pubkey}
    elif trusted.tofu is not None:
        tofu = {"tofu": trusted.tofu}
    emit(log, logging.INFO, "dry-run-ok", manifest=m.name, swarm=trusted.swarm_id, policy=trusted.policy, **tofu,
         arch_hash=prepared.arch_hash, arch_match=prepared.arch_hash == m.model.arch_hash,
         params=sum(p.numel() for p in prepared.model.parameters()), train_batches=_len_or_dash(prepared.train_loader),
         probed=probed.loaders,
         optimizer=type(optimizer).__name__, scheduler=type(scheduler).__name__ if scheduler is not None else None,
         strategy=m.aggregation.name, topology=m.topology.name,
         personalization=m.personalization.mode, shared_params=sum(p.numel() for p in personal.shared.parameters()))


def _len_or_dash(loader: Any) -> int | str:
    try:
        return len(loader)
    except TypeError:
        return "-"

