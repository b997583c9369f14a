"""What a daemon writes to disk: end-of-round checkpoints, the final checkpoint and the final model.

After each round the node's state is encoded on the loop (one memcpy: training may go on while it is written) and
written off the loop every ``--checkpoint-every`` rounds; a round that was skipped is kept as the unsaved snapshot
a stop writes (`save_unsaved`). After the last round: a checkpoint marked final (written first: killed before the
model file, a restart finds the run finished and writes the model from it), then the final model and the
``finished`` line with the whole run's totals (earlier processes included). Started again on that finished
checkpoint, the daemon says ``already-finished`` and writes the final model only if it is missing.

Owns the checkpoint store, the unsaved snapshot and the final model's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, QuinkglError
from quinkgl_cli.events import emit
from quinkgl_cli.node.checkpoint import FINAL_MODEL_NAME, CheckpointStore, save_final_model
from quinkgl_cli.node.core import Node, RoundMetrics
from quinkgl_cli.node.metrics import PERSONAL_FIELDS
from quinkgl_cli.node.process import peak_rss_mb
from quinkgl_cli.node.startup import Prepared

log = logging.getLogger("quinkgl.daemon")


@dataclass(frozen=True)
class Snapshot:
    """A node's state encoded as checkpoint bytes at one moment (the end of a round, or the end of the run)."""

    round: int
    data: bytes
    encode_seconds: float


class RunFiles:
    def __init__(self, node: Node, prepared: Prepared) -> None:
        options = prepared.options.checkpoints
        self.node = node
        self.prepared = prepared
        self.every = options.checkpoint_every
        self.store = CheckpointStore(prepared.checkpoint_dir, keep=options.keep_checkpoints)
        self.final_model = Path(options.final_model or (prepared.checkpoint_dir / FINAL_MODEL_NAME))
        # The last completed round's snapshot while it is not on disk (--checkpoint-every skipped it): what a stop
        # saves. None when the newest checkpoint on disk already is that round's.
        self.unsaved: Snapshot | None = None

    def snapshot(self, final_metrics: dict[str, Any] | None = None) -> Snapshot:
        """The node's state now, serialized here on the loop; ``final_metrics`` marks the run's final checkpoint."""
        started = time.perf_counter()
        state = self.node.state_dict()
        if final_metrics is not None:
            state.meta["final"] = True
            state.meta["final_metrics"] = final_metrics
        return Snapshot(self.node.completed_round, self.store.encode(state), time.perf_counter() - started)

    async def save(self, snapshot: Snapshot, reason: str) -> Path:
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.store.write, snapshot.round, snapshot.data)
        except QuinkglError as exc:
            emit(log, logging.ERROR, "checkpoint-failed", error=exc.one_line())
            raise
        emit(log, logging.INFO, "checkpoint-saved", path=path, reason=reason,
             seconds=round(snapshot.encode_seconds + time.perf_counter() - started, 4), context={"round": snapshot.round})
        return path

    async def after_round(self, metrics: RoundMetrics) -> None:
        snapshot = self.snapshot()
        if self.node.completed_round % self.every == 0 or self.node.finished():
            await self.save(snapshot, reason="round")
            self.unsaved = None
        else:
            self.unsaved = snapshot

    async def save_unsaved(self) -> None:
        """Asked to stop: the last completed round's end-of-round state, never the half-done round's."""
        if self.unsaved is not None:
            await self.save(self.unsaved, reason="stop")

    def newest_checkpoint(self) -> Path | None:
        files = self.store.files()
        return files[-1].path if files else None

    async def write_final_model(self, metrics: dict[str, Any]) -> Path:
        node = self.node
        directory = self.final_model.parent
        if not directory.is_dir():
            # Start-up refused a missing directory (a typo never gets this far): this one vanished while the run went
            # on. Losing the run's model would be worse than making it again; the warning says that it happened.
            emit(log, logging.WARNING, "final-model-directory-recreated", directory=directory,
                 hint="it was removed while the daemon ran; check what removed it")
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise IOFailure(f"cannot create {directory} again for the final model: {exc.strerror}",
                                "the last checkpoint holds the model: start the run again once the path is writable") from exc
        meta = {"node_id": node.node_id, "swarm_id": node.swarm_id, "round": node.completed_round,
                "arch_hash": self.prepared.arch_hash, "metrics": metrics}
        await asyncio.to_thread(save_final_model, self.final_model, node.served_model(), meta)
        return self.final_model

    async def write_stopped_model(self) -> Path | None:
        """A stop before the last round (a long-lived daemon, with no --rounds, only ever stops this way) leaves the
        model the peer serves, with the last completed round's metrics; its path, None before any round."""
        if self.node.completed_round > 0 and not self.node.finished():
            return await self.write_final_model(self.node.recorder.last())
        return None

    async def already_finished(self) -> None:
        """Resumed on the final checkpoint of a run that reached its rounds: nothing to train. A restart has no
        peers yet, so finishing again would overwrite the final model with one that skipped the final consensus."""
        resumed = self.prepared.resume_state
        metrics = dict((resumed.meta.get("final_metrics") if resumed is not None else None) or {})
        restored = not self.final_model.exists()
        if restored:  # the run was killed between its final checkpoint and the final model: that is the same model
            await self.write_final_model(metrics)
        emit(log, logging.INFO, "already-finished", rounds=self.node.completed_round,
             val_accuracy=metrics.get("val_accuracy"), checkpoint=self.prepared.resume_file,
             final_model=self.final_model, final_model_restored=restored,
             hint="nothing to train; raise --rounds to train further, or pass --no-resume to start over")

    async def finish(self, final_eval: dict[str, Any] | None, started_at: float) -> None:
        node = self.node
        last = node.recorder.last()
        last.update(final_eval or {})
        await self.save(self.snapshot(final_metrics=last), reason="final")
        path = await self.write_final_model(last)
        totals = node.recorder.recorded()  # what the rounds' and the final consensus's metrics add up to
        emit(log, logging.INFO, "finished", rounds=node.completed_round, loss=last.get("loss"),
             val_loss=last.get("val_loss"), val_accuracy=last.get("val_accuracy"),
             **{k: last[k] for k in PERSONAL_FIELDS if last.get(k) is not None}, peers_met=totals["peers_met"],
             bytes_sent=totals["bytes_sent"], bytes_received=totals["bytes_received"],
             seconds=round(time.monotonic() - started_at, 1), peak_rss_mb=round(peak_rss_mb(), 1), final_model=path)
