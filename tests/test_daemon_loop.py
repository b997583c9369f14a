"""The daemon's asyncio driver in one process over the memory transport: cadence, early wake, stop, crash paths."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.checkpoint import CheckpointStore
from quinkgl_cli.node.daemon import Daemon, DaemonOptions, Prepared, prepare, run_daemon
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

NAN_SCRIPT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
def build_model(manifest, **kw):
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
def build_loaders(manifest, **kw):
    x = torch.full((8, 64), float("nan"))
    y = torch.zeros(8, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=4), None
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _key, _pub, _swarm = ls.digits_manifest(tmp_path_factory.mktemp("m"), name="loop-test",
                                                  training={"local_epochs": "1", "local_steps": "3"})
    return path


def options(manifest: Path, tmp: Path, node_id: str, **kw: Any) -> DaemonOptions:
    base = dict(manifest=manifest, script=ls.DIGITS_SCRIPT, node_id=node_id, trust_policy="open", rounds=4,
                gossip_interval=0.3, checkpoint_dir=tmp / node_id, script_args={"shard": node_id[-1], "num_shards": "2"})
    base.update(kw)
    return DaemonOptions.from_flags(**base)


def memory_factory(net: MemoryNetwork):
    def make(p: Prepared) -> MemoryTransport:
        return MemoryTransport(net, p.options.node_id, swarm_id=p.trusted.swarm_id, arch_hash=p.trusted.manifest.model.arch_hash)
    return make


def test_cadence_and_early_wake(manifest: Path, tmp_path: Path) -> None:
    net = MemoryNetwork()
    daemons = [Daemon(prepare(options(manifest, tmp_path, f"p{i}", min_peers=1)), LogContext(f"p{i}"), memory_factory(net))
               for i in range(2)]

    async def both() -> list[int]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        codes = await asyncio.gather(*(d.run() for d in daemons))
        # 4 rounds start 0.3 s apart: the last starts >= 0.9 s after the first, and none waits out its interval
        # once both peers have answered.
        assert loop.time() - started >= 0.9
        return list(codes)

    assert asyncio.run(both()) == [0, 0]
    for d in daemons:
        hist = d.node.history
        assert [h["round"] for h in hist] == [1, 2, 3, 4]
        assert all(h["peers"] == 1 for h in hist)
        assert all(h["duration"] < 0.25 for h in hist[1:]), [h["duration"] for h in hist]


def test_lone_daemon_says_so_and_sigterm_stops_with_checkpoint(manifest: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=1000, gossip_interval=0.05)), LogContext("p0"),
               memory_factory(net))

    async def go() -> int:
        task = asyncio.ensure_future(d.run())
        while d.node.completed_round < 3:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # an impatient second Ctrl-C, before the stop is done: told what goes on
        return await asyncio.wait_for(task, timeout=10)

    with caplog.at_level(logging.INFO):
        assert asyncio.run(go()) == ExitCode.INTERRUPTED
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("alone ") for m in messages) == 1  # once, not every round
    assert [m.split()[0] for m in messages if "stopping" in m.split()[0]] == ["stopping", "still-stopping"]
    assert any(m.startswith("still-stopping signal=SIGINT ") and "SIGKILL" in m for m in messages)
    assert any(m.startswith("stopping signal=SIGTERM") for m in messages)
    # The stop line names where the model went, as the finished line does.
    (stopped,) = [m for m in messages if m.startswith("stopped ")]
    assert f"final_model={tmp_path / 'p0' / 'final_model.safetensors'}" in stopped, stopped
    saved = CheckpointStore(tmp_path / "p0").latest()
    assert saved is not None and saved[1].meta["round"] == d.node.completed_round
    from quinkgl_cli.node.checkpoint import load_final_model

    # A daemon without a round target only ever stops this way: it still leaves the model it serves.
    tensors, meta = load_final_model(tmp_path / "p0" / "final_model.safetensors")
    served = d.node.served_model().state_dict()
    assert meta["round"] == d.node.completed_round and all(torch.equal(tensors[k], served[k]) for k in served)


def test_training_failure_exits_with_its_error_and_saves_nothing(manifest: Path, tmp_path: Path) -> None:
    script = tmp_path / "nan_script.py"
    script.write_text(NAN_SCRIPT)
    opts = options(manifest, tmp_path, "p0", script=script, strict_manifest=False, script_args={})
    with pytest.raises(NodeConfigError, match="training loss became nan"):
        run_daemon(opts, transport_factory=memory_factory(MemoryNetwork()))
    assert CheckpointStore(tmp_path / "p0").files() == []


class BrokenTransport(MemoryTransport):
    async def start(self, events: Any) -> None:
        raise RuntimeError("socket exploded")


def test_loop_death_is_a_nonzero_exit(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = MemoryNetwork()
    code = run_daemon(options(manifest, tmp_path, "p0"), transport_factory=lambda p: BrokenTransport(net, "p0"))
    assert code == ExitCode.NODE
    died = [ln for ln in capsys.readouterr().out.splitlines() if " loop-died " in ln]
    assert len(died) == 1 and "RuntimeError: socket exploded" in died[0] and "Traceback" in died[0]


def test_checkpoint_that_does_not_fit_the_model_is_a_clear_error(manifest: Path, tmp_path: Path) -> None:
    import torch

    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.node.core import NodeState

    swarm = load_trusted(manifest, "open").swarm_id
    CheckpointStore(tmp_path / "p0").save(NodeState({"model.0.weight": torch.zeros(3, 3)},
                                                    {"round": 2, "swarm_id": swarm, "node_id": "p0", "optimizer": {}}))
    with pytest.raises(NodeConfigError, match="does not fit this model") as exc:
        run_daemon(options(manifest, tmp_path, "p0"), transport_factory=memory_factory(MemoryNetwork()))
    assert "--no-resume" in exc.value.one_line()


def _model_and_optimizer(state: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in state.tensors.items() if k.startswith(("model.", "optim."))}


@pytest.mark.parametrize(("every", "stop_in", "saved_round", "written_on_stop"), [(1, 3, 2, False), (2, 4, 3, True)])
def test_stop_mid_round_keeps_the_end_of_round_state(manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     every: int, stop_in: int, saved_round: int,
                                                     written_on_stop: bool) -> None:
    """SIGTERM while round N+1 trains: the checkpoint is round N's end-of-round state, not the half-trained model."""
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=10, gossip_interval=0.05, checkpoint_every=every)),
               LogContext("p0"), memory_factory(MemoryNetwork()))
    node = d.node
    at_round_end: dict[int, dict[str, Any]] = {}
    train, end_round = node.train_round, node.end_round

    def end_round_recorded() -> Any:
        metrics = end_round()
        at_round_end[node.completed_round] = _model_and_optimizer(node.state_dict())
        return metrics

    def train_then_sigterm() -> Any:
        stats = train()  # the model and optimizer move on: round `stop_in` is half done when the stop lands
        if node.round == stop_in:
            os.kill(os.getpid(), signal.SIGTERM)
            assert d.train_stop.wait(10)  # the loop's handler ran: the round is abandoned once we return
        return stats

    node.train_round, node.end_round = train_then_sigterm, end_round_recorded  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.INTERRUPTED
    assert node.completed_round == saved_round
    f, saved = CheckpointStore(tmp_path / "p0").latest()  # type: ignore[misc]
    assert saved.meta["round"] == f.round == saved_round
    got = _model_and_optimizer(saved)
    want = at_round_end[saved_round]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], v) for k, v in _model_and_optimizer(node.state_dict()).items())  # really half-trained
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint-saved ")]
    assert any("reason=stop" in m for m in reasons) == written_on_stop
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped ")]
    assert stopped == [f"stopped completed_round={saved_round} signal=SIGTERM checkpoint={f.path}"
                       f" final_model={tmp_path / 'p0' / 'final_model.safetensors'}"]


def _run_pair(manifest: Path, tmp: Path, rounds: int) -> list[Daemon]:
    net = MemoryNetwork()
    daemons = [Daemon(prepare(options(manifest, tmp, f"p{i}", rounds=rounds, gossip_interval=0.2, min_peers=1)),
                      LogContext(f"p{i}"), memory_factory(net)) for i in range(2)]

    async def both() -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in daemons)))

    assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    for d in daemons:
        _release(d)
    return daemons


def _release(d: Daemon) -> None:
    """A daemon holds its directories for its process's life; the next daemon in this test process needs them."""
    for lock in d.prepared.locks:
        lock.release()


def test_restarting_a_finished_daemon_keeps_its_final_model(manifest: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from quinkgl_cli.node.checkpoint import load_final_model

    first = _run_pair(manifest, tmp_path, rounds=2)[0]
    final = tmp_path / "p0" / "final_model.safetensors"
    f, state = CheckpointStore(tmp_path / "p0").latest()  # type: ignore[misc]
    assert state.meta["final"] is True and f.round == 2
    model_bytes, files = final.read_bytes(), CheckpointStore(tmp_path / "p0").files()
    final_tensors, _meta = load_final_model(final)
    # The final model is the served one (node.serving), and the final checkpoint's serving state gives it back.
    first.node.load_state_dict(state)
    served = first.node.served_model().state_dict()
    assert served.keys() == final_tensors.keys() and all(torch.equal(final_tensors[k], served[k]) for k in served)

    def restart() -> Daemon:
        d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=2)), LogContext("p0"), memory_factory(MemoryNetwork()))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
        _release(d)
        return d

    again = restart()
    messages = [r.getMessage() for r in caplog.records]
    done = [m for m in messages if m.startswith("already-finished ")]
    assert len(done) == 1 and "rounds=2 " in done[0] and "final_model_restored=false" in done[0], messages
    assert not any(m.startswith(("round-end", "checkpoint-saved", "finished ")) for m in messages)
    assert again.node.history == first.node.history
    assert final.read_bytes() == model_bytes and CheckpointStore(tmp_path / "p0").files() == files

    # Killed between the final checkpoint and the model file: the restart writes that same model.
    final.unlink()
    restart()
    assert any("final_model_restored=true" in r.getMessage() for r in caplog.records)
    restored, _meta = load_final_model(final)
    assert restored.keys() == final_tensors.keys() and all(torch.equal(restored[k], final_tensors[k]) for k in restored)

    # A higher round target trains on from the finished state.
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=3)), LogContext("p0"), memory_factory(MemoryNetwork()))
    assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    assert [h["round"] for h in d.node.history] == [1, 2, 3]


def test_resume_skips_poisoned_checkpoints_and_refuses_when_none_is_good(manifest: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    _run_pair(manifest, tmp_path, rounds=2)
    store = CheckpointStore(tmp_path / "p0")
    f, state = store.latest()  # type: ignore[misc]
    state.tensors["model.0.weight"][0, 0] = float("nan")  # once resumed, and then exit 7 at the first step
    poisoned = store.write(f.round, CheckpointStore.encode(state))
    with caplog.at_level(logging.INFO):
        caplog.clear()
        d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=3)), LogContext("p0"), memory_factory(MemoryNetwork()))
        assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    _release(d)
    invalid = [r for r in caplog.records if getattr(r, "qgl_event", "") == "checkpoint-invalid"]
    assert len(invalid) == 1 and invalid[0].qgl_fields["path"] == str(poisoned)  # type: ignore[attr-defined]
    assert "holds NaN or Inf" in invalid[0].qgl_fields["reason"]  # type: ignore[attr-defined]
    assert any(r.getMessage().startswith("resumed from_round=2 ") for r in caplog.records)
    assert [h["round"] for h in d.node.history] == [1, 2, 3]
    # Every checkpoint damaged: a one-line refusal (7), not a silent start from round 0.
    for ckpt in store.files():
        ckpt.path.write_bytes(ckpt.path.read_bytes()[:100])
    with pytest.raises(NodeConfigError, match="no checkpoint in .* can be resumed") as exc:
        run_daemon(options(manifest, tmp_path, "p0", rounds=4), transport_factory=memory_factory(MemoryNetwork()))
    assert exc.value.code == ExitCode.NODE and "--no-resume" in exc.value.one_line()


def test_manifest_expiring_during_the_run_stops_the_daemon_cleanly(manifest: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    prepared = prepare(options(manifest, tmp_path, "p0", rounds=10, gossip_interval=0.05))
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    trusted = replace(prepared.trusted, manifest=prepared.trusted.manifest.model_copy(update={"expires_at": expires}))
    d = Daemon(replace(prepared, trusted=trusted), LogContext("p0"), memory_factory(MemoryNetwork()))
    # The clock passes expires_at once two rounds are done.
    d.utc_now = lambda: expires + (timedelta(seconds=1) if d.node.completed_round >= 2 else -timedelta(hours=1))
    with caplog.at_level(logging.INFO):
        code = asyncio.run(asyncio.wait_for(d.run(), timeout=60))
    _release(d)
    assert code == ExitCode.TRUST == 4
    events = {getattr(r, "qgl_event", ""): r for r in caplog.records}
    assert "expired at 2030-01-01T00:00:00Z" in events["manifest-expired"].qgl_fields["error"]  # type: ignore[attr-defined]
    stopped = events["stopped"].qgl_fields  # type: ignore[attr-defined]
    assert stopped["reason"] == "manifest-expired" and stopped["completed_round"] == 2
    assert [h["round"] for h in d.node.history] == [1, 2] and CheckpointStore(tmp_path / "p0").files()[-1].round == 2
    assert not any(r.getMessage().startswith("finished") for r in caplog.records)


def test_late_round_still_waits_for_this_rounds_updates_and_next_round_starts_at_once(
        manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Training longer than the interval: every gossip deadline is already past. p1 finishes each round's training
    just after p0; p0 must still wait for p1's update of the same round instead of aggregating last round's."""
    # Training a little longer than the interval: a round that waited for the next interval boundary would start
    # about 0.85 s late, one that starts at once within scheduling noise (0.4 s of slack: a loaded machine).
    interval, rounds, train_s = 1.0, 3, 1.1
    net = MemoryNetwork()
    d0, d1 = (Daemon(prepare(options(manifest, tmp_path, f"p{i}", rounds=rounds, gossip_interval=interval, min_peers=1)),
                     LogContext(f"p{i}"), memory_factory(net)) for i in range(2))
    p0_trained = {r: threading.Event() for r in range(1, rounds + 1)}
    inbox_at_aggregate: dict[int, dict[str, int]] = {}
    begun: list[float] = []

    def slow(node: Any, after: Any) -> Any:
        train = node.train_round

        def run() -> Any:
            stats = train()
            time.sleep(train_s)  # stands in for a heavy model's training (this is the work, not a wait)
            after(node.round)
            return stats
        return run

    def p1_after(round_: int) -> None:
        assert p0_trained[round_].wait(10)
        time.sleep(0.03)  # p1's update lands a moment after p0 has started its (late) gossip step

    d0.node.train_round = slow(d0.node, lambda r: p0_trained[r].set())  # type: ignore[method-assign]
    d1.node.train_round = slow(d1.node, p1_after)  # type: ignore[method-assign]
    aggregate, begin = d0.node.aggregate, d0.node.begin_round

    def aggregate_recorded() -> Any:
        held = d0.node.inbox.snapshot()
        inbox_at_aggregate.setdefault(d0.node.round, {s: m.round for s, m in held.items()})
        return aggregate()

    def begin_recorded() -> int:
        begun.append(time.monotonic())
        return begin()

    d0.node.aggregate, d0.node.begin_round = aggregate_recorded, begin_recorded  # type: ignore[method-assign]

    async def both() -> list[int]:
        return list(await asyncio.gather(d0.run(), d1.run()))

    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    assert [inbox_at_aggregate[r] for r in range(1, rounds + 1)] == [{"p1": r} for r in range(1, rounds + 1)]
    assert all(h["peers"] == 1 for h in d0.node.history)
    # Overran: each next round began right after the previous one ended, not at a later interval boundary.
    for r in range(rounds - 1):
        assert begun[r + 1] - begun[r] - d0.node.history[r]["duration"] < 0.4, (begun, d0.node.history)
    assert sum(r.getMessage().startswith("behind-schedule ") for r in caplog.records if r.name == "quinkgl.daemon") >= 1


def test_start_up_is_timed_from_the_process_start() -> None:
    """`first-round seconds_since_start` must include interpreter start and imports, not only the daemon's own set-up."""
    import subprocess
    import sys

    code = ("import time; time.sleep(0.5)  # what start-up spends before the daemon module is imported\n"
            "from quinkgl_cli.node.process import process_started_at\n"
            "print(time.monotonic() - process_started_at())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert 0.5 <= float(out.stdout) < 30


SLOW_SCRIPT = """
import time
import torch
from torch import nn
from torch.utils.data import TensorDataset

class SlowLoader:
    '''Once armed, batches take a while to come (a heavy model's training, in effect): a round trains ~1 s.'''
    armed = False
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.rand(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g))
    def __iter__(self):
        x, y = self.dataset.tensors
        for i in range(0, 96, 32):
            if self.armed:
                time.sleep(0.35)
            yield x[i:i + 32], y[i:i + 32]

def build_model(manifest, **kw):
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def build_loaders(manifest, **kw):
    return SlowLoader(), None
"""


def test_training_runs_off_the_event_loop(manifest: Path, tmp_path: Path) -> None:
    """While p0 trains for ~1 s, its loop still takes p1's updates in and runs timers."""
    (tmp_path / "slow_script.py").write_text(SLOW_SCRIPT)
    net = MemoryNetwork()
    slow = Daemon(prepare(options(manifest, tmp_path, "p0", script=tmp_path / "slow_script.py", rounds=1, min_peers=1,
                                  gossip_interval=0.2, script_args={})), LogContext("p0"), memory_factory(net))
    fast = Daemon(prepare(options(manifest, tmp_path, "p1", rounds=4, min_peers=1, gossip_interval=0.2)),
                  LogContext("p1"), memory_factory(net))
    slow.prepared.train_loader.armed = True  # only now: the node's set-up reads the loader too
    training: list[float] = []
    arrivals: list[float] = []
    ticks: list[float] = []
    train, on_model = slow.node.train_round, slow.node.on_model

    def timed_train() -> Any:
        training.append(time.monotonic())
        try:
            return train()
        finally:
            training.append(time.monotonic())

    def timed_arrival(update: Any) -> None:
        arrivals.append(time.monotonic())
        on_model(update)

    slow.node.train_round, slow.node.on_model = timed_train, timed_arrival  # type: ignore[method-assign]

    async def both() -> list[int]:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        ticker = asyncio.ensure_future(tick())
        try:
            return list(await asyncio.gather(slow.run(), fast.run()))
        finally:
            ticker.cancel()

    assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    start, end = training
    assert end - start > 0.9
    assert any(start < t < end for t in arrivals), (training, arrivals)
    assert sum(start < t < end for t in ticks) >= 5


def test_failed_aggregation_drops_the_updates_and_the_daemon_goes_on(manifest: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    daemons = [Daemon(prepare(options(manifest, tmp_path, f"p{i}", rounds=3, min_peers=1, gossip_interval=0.2)),
                      LogContext(f"p{i}"), memory_factory(net)) for i in range(2)]
    node = daemons[0].node
    aggregate = node.aggregator.aggregate

    def broken_in_round_2(local: Any, others: Any, round_: int) -> Any:
        if node.round == 2:
            raise RuntimeError("strategy exploded")
        return aggregate(local, others, round_)

    node.aggregator.aggregate = broken_in_round_2  # type: ignore[method-assign]

    async def both() -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in daemons)))

    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    mine = [r for r in caplog.records if getattr(r, "node", None) == "p0" and getattr(r, "round", None) == 2]
    failed = [r for r in mine if r.getMessage().startswith("aggregation-failed ")]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and "strategy exploded" in failed[0].getMessage()
    assert any(r.getMessage().startswith("update-dropped peer=p1 ") and "aggregation failed" in r.getMessage() for r in mine)
    hist = node.history
    assert [h["round"] for h in hist] == [1, 2, 3]
    assert hist[1]["peers"] == 0 and hist[1]["updates_dropped"] >= 1 and hist[2]["peers"] == 1


def test_training_and_checkpoint_flags_take_effect(manifest: Path, tmp_path: Path) -> None:
    from quinkgl_cli.node.checkpoint import load_final_model

    final = tmp_path / "elsewhere" / "model.safetensors"
    final.parent.mkdir()  # as `run` requires of an output's directory
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=3, gossip_interval=0.05, local_epochs=2, local_steps=30,
                               checkpoint_every=2, keep_checkpoints=5, final_model=final)),
               LogContext("p0"), memory_factory(MemoryNetwork()))
    steps: list[int] = []
    train = d.node.train_round

    def counted() -> Any:
        stats = train()
        steps.append(stats.steps)
        return stats

    d.node.train_round = counted  # type: ignore[method-assign]
    assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    batches = len(d.prepared.train_loader)
    assert batches < 30 < 2 * batches  # so 30 steps needs the second epoch and the cap stops it
    assert steps == [30, 30, 30]
    # Every 2nd round, the last round, and the final checkpoint.
    assert [f.round for f in CheckpointStore(tmp_path / "p0").files()] == [2, 3, 3]
    tensors, meta = load_final_model(final)
    assert meta["round"] == 3 and "0.weight" in tensors
    assert not (tmp_path / "p0" / "final_model.safetensors").exists()


def test_final_model_directory_removed_during_the_run_is_made_again_with_a_warning(
        manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from quinkgl_cli.node.checkpoint import load_final_model

    final = tmp_path / "models" / "model.safetensors"
    final.parent.mkdir()
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=2, gossip_interval=0.05, final_model=final)),
               LogContext("p0"), memory_factory(MemoryNetwork()))
    train = d.node.train_round

    def removing_the_directory() -> Any:
        if final.parent.exists():
            final.parent.rmdir()
        return train()

    d.node.train_round = removing_the_directory  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    _tensors, meta = load_final_model(final)
    assert meta["round"] == 2
    warned = [r for r in caplog.records if r.getMessage().startswith("final-model-directory-recreated ")]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert f"directory={final.parent} " in warned[0].getMessage()


@pytest.mark.parametrize(("asked", "capped"), [(5, True), (2, False)])
def test_rounds_beyond_the_manifests_round_limit_are_capped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, asked: int, capped: bool) -> None:
    """`run --rounds 30` on a manifest with round_limit 20 ran 20 rounds, and only `started rounds=20` said so
    (`simulate` printed a note)."""
    limited, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m", name="limited", rounds=2,
                                                    training={"local_epochs": "1", "local_steps": "2"})
    d = Daemon(prepare(options(limited, tmp_path, "p0", rounds=asked, gossip_interval=0.05)), LogContext("p0"),
               memory_factory(MemoryNetwork()))
    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    assert d.node.completed_round == 2
    warned = [r for r in caplog.records if r.getMessage().startswith("rounds-capped ")]
    assert [r.levelno for r in warned] == ([logging.WARNING] if capped else [])
    assert not capped or warned[0].getMessage().startswith(f"rounds-capped asked={asked} round_limit=2 ")


def test_ipv8_transport_is_built_from_manifest_flags_and_model(manifest: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import quinkgl_cli.transport.ipv8 as ipv8
    from quinkgl_cli import wire
    from quinkgl_cli.node.daemon import make_ipv8_transport
    from quinkgl_cli.tensors import shared_specs

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(ipv8, "IPv8Transport", lambda **kwargs: built.append(kwargs) or kwargs)
    prepared = prepare(options(manifest, tmp_path, "p0", dry_run=True, port=7301,
                               bootstrap_peers=["127.0.0.1:7002", "127.0.0.1:7101"]))
    trusted = dataclasses.replace(prepared.trusted, manifest=prepared.trusted.manifest.model_copy(
        update={"bootstrap_peers": ("127.0.0.1:7101", "127.0.0.1:7102")}))
    prepared = dataclasses.replace(prepared, trusted=trusted)
    kw = make_ipv8_transport(prepared)
    assert kw["bootstrap"] == ["127.0.0.1:7002", "127.0.0.1:7101", "127.0.0.1:7102"]  # flags first, no repeats
    assert (kw["node_id"], kw["port"], kw["listen_host"], kw["swarm_id"]) == ("p0", 7301, "127.0.0.1", trusted.swarm_id)
    # Discovery beyond the given peers is off unless asked for (DaemonOptions and `quinkgl run` both default off).
    assert kw.get("enable_public_bootstrap", False) is False and kw.get("enable_lan_discovery", False) is False
    import inspect

    params = inspect.signature(ipv8.transport.IPv8Transport).parameters
    assert params["enable_public_bootstrap"].default is False and params["enable_lan_discovery"].default is False
    # The offer size limit follows the model: a bigger model may send bigger updates.
    assert kw["max_model_bytes"] == wire.max_blob_bytes(shared_specs(prepared.model)) * 2
    big = make_ipv8_transport(dataclasses.replace(prepared, model=torch.nn.Linear(64, 4096)))
    assert big["max_model_bytes"] == wire.max_blob_bytes(shared_specs(torch.nn.Linear(64, 4096))) * 2
    assert big["max_model_bytes"] > 10 * kw["max_model_bytes"]
    network = dataclasses.replace(prepared.options.network,
                                  transport_options={"enable_public_bootstrap": True, "enable_lan_discovery": True})
    on = make_ipv8_transport(dataclasses.replace(prepared, options=dataclasses.replace(prepared.options, network=network)))
    assert on["enable_public_bootstrap"] is True and on["enable_lan_discovery"] is True


def test_back_to_back_rounds_pace_on_a_slower_peer(manifest: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Rounds back to back, p1 about 20 times slower than p0. Unpaced, p0 finishes all its rounds before p1 has
    done two and drops p1's updates as stale (max_staleness 2); paced, once p1's first update shows the lag, p0
    waits for it and then stays within reach: nothing of p1's is stale any more and p0 keeps aggregating it."""
    rounds, slow_s = 20, 0.1
    net = MemoryNetwork()
    d0, d1 = (Daemon(prepare(options(manifest, tmp_path, f"p{i}", rounds=rounds, gossip_interval=0.01, min_peers=1)),
                     LogContext(f"p{i}"), memory_factory(net)) for i in range(2))
    train = d1.node.train_round

    def slow() -> Any:
        stats = train()
        time.sleep(slow_s)  # stands in for a slower device's training (this is the work, not a wait)
        return stats

    d1.node.train_round = slow  # type: ignore[method-assign]

    ended: dict[str, float] = {}

    async def timed(d: Daemon) -> int:
        code = await d.run()
        ended[d.options.node_id] = time.monotonic()
        return code

    async def both() -> list[int]:
        return list(await asyncio.gather(timed(d0), timed(d1)))

    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="quinkgl"):
        assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    messages = [r.getMessage() for r in caplog.records]
    first_wait = next(i for i, m in enumerate(messages) if m.startswith("paced "))
    # A wait may run out on a loaded machine (its patience comes from the rounds measured so far); p0 must still
    # catch p1 up by waiting.
    waits = [m for m in messages[first_wait:] if m.startswith("paced ")]
    assert any("caught_up=true" in m for m in waits), waits
    # p0's drops name p1 (p1's own drops name p0). A wait that ran out lets p0 a round ahead, which may make p1's
    # next update stale (seen once at load 5): at most one such drop per wait that ran out, none otherwise.
    stale = [m for m in messages[first_wait:] if m.startswith("update-dropped peer=p1") and "stale" in m]
    assert len(stale) <= sum("caught_up=false" in m for m in waits), (stale, waits)
    assert sum(h["peers"] for h in d0.node.history[-10:]) >= 4, [h["peers"] for h in d0.node.history]
    # Held to p1's pace: unpaced, p0 would be done in a fraction of a second.
    assert ended["p0"] - started > 0.7 * (ended["p1"] - started), ended
    assert any(m.startswith("pacing ") for m in messages)


def test_finished_counts_the_whole_run_across_a_restart(manifest: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Peers met and bytes moved before a restart are in the restarted daemon's `finished` line."""
    from quinkgl_cli.events import FIELDS_ATTR

    first = _run_pair(manifest, tmp_path, rounds=2)[0]
    sent_before = first.transport.stats.bytes_sent
    assert sent_before > 0
    # Restarted alone with a higher round target: one more round, no peer this time.
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=3, gossip_interval=0.05)), LogContext("p0"),
               memory_factory(MemoryNetwork()))
    with caplog.at_level(logging.INFO):
        caplog.clear()
        assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    _release(d)
    assert d.transport.stats.bytes_sent == 0
    (finished,) = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage().startswith("finished ")]
    assert finished["rounds"] == 3 and finished["peers_met"] == 1
    assert finished["bytes_sent"] == sent_before and finished["bytes_received"] > 0


class _PortTaken(MemoryTransport):
    async def start(self, events: Any) -> None:
        from quinkgl_cli.errors import NetworkError

        raise NetworkError("cannot bind UDP 127.0.0.1:7001: Address already in use", "choose another --port")


def test_a_start_that_fails_gives_back_the_directories_it_created(manifest: Path, tmp_path: Path) -> None:
    from quinkgl_cli.errors import NetworkError
    from quinkgl_cli.node.dirlock import lock_directory

    def taken(p: Prepared) -> MemoryTransport:
        return _PortTaken(MemoryNetwork(), p.options.node_id, swarm_id=p.trusted.swarm_id,
                          arch_hash=p.trusted.manifest.model.arch_hash)

    fresh = tmp_path / "fresh" / "p0"
    with pytest.raises(NetworkError):
        run_daemon(options(manifest, tmp_path, "p0", checkpoint_dir=fresh), transport_factory=taken)
    assert not fresh.exists()  # no empty directory left behind
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(NetworkError):
        run_daemon(options(manifest, tmp_path, "p0", checkpoint_dir=kept), transport_factory=taken)
    assert (kept / "notes.txt").read_text() == "mine"
    lock_directory(kept, "checkpoint directory", "hint").release()  # and not left locked

    def interrupted(p: Prepared) -> MemoryTransport:  # SIGTERM while the node is built: `run` raises KeyboardInterrupt
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_daemon(options(manifest, tmp_path, "p0", checkpoint_dir=fresh), transport_factory=interrupted)
    assert not fresh.exists()


def test_a_checkpoint_path_that_is_a_file_is_named_as_such(manifest: Path, tmp_path: Path) -> None:
    from quinkgl_cli.errors import IOFailure

    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(IOFailure) as err:
        prepare(options(manifest, tmp_path, "p0", checkpoint_dir=path))
    assert "is not a directory" in err.value.one_line() and "other daemon" not in err.value.one_line()


def test_a_node_that_learns_its_key_is_revoked_stops_before_its_next_round(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12: a revoked node must not train on alone: once its transport adopts a list naming its own key, the
    daemon stops as on an expiry (``key-revoked``, exit 4), keeping its last checkpoint."""
    from datetime import UTC, datetime

    from quinkgl_cli import keys
    from quinkgl_cli.manifest import admission as docs
    from quinkgl_cli.transport.admission import Admission, AdmissionSettings

    path, creator_key, pub, swarm = ls.digits_manifest(tmp_path / "m", name="revoke-test",
                                                   training={"local_epochs": "1", "local_steps": "3"})
    prepared = prepare(options(path, tmp_path, "p0", rounds=10, gossip_interval=0.05))
    transport = MemoryTransport(MemoryNetwork(), "p0", swarm_id=swarm, arch_hash=prepared.trusted.manifest.model.arch_hash,
                                admission=Admission(AdmissionSettings(swarm, pub), "p0"))
    d = Daemon(prepared, LogContext("p0"), lambda _p: transport)
    listed = docs.sign(docs.RevocationList(swarm_id=swarm, version=1, issued_at=datetime.now(UTC).replace(microsecond=0),
                                           revoked=(docs.fingerprint(transport.public_key),)),
                       keys.load_private_key(creator_key))
    clock = d.utc_now

    def now() -> datetime:  # asked before every round: the list arrives (by gossip, in the IPv8 transport) after round 2
        if d.node.completed_round >= 2 and not transport.revoked():
            assert transport.admission is not None and transport.admission.consider(listed.text(), "peer") == "adopted"
        return clock()

    d.utc_now = now
    with caplog.at_level(logging.INFO):
        code = asyncio.run(asyncio.wait_for(d.run(), timeout=60))
    _release(d)
    assert code == ExitCode.TRUST == 4
    events = {getattr(r, "qgl_event", ""): r for r in caplog.records}
    assert "revocation list" in events["key-revoked"].qgl_fields["error"]  # type: ignore[attr-defined]
    stopped = events["stopped"].qgl_fields  # type: ignore[attr-defined]
    assert stopped["reason"] == "key-revoked" and stopped["completed_round"] == 2
    assert CheckpointStore(tmp_path / "p0").files()[-1].round == 2


class _States:
    """An observer that keeps the state of every snapshot the daemon publishes."""

    def __init__(self) -> None:
        self.states: list[str] = []

    def update(self, snapshot: Any) -> None:
        self.states.append(snapshot.state)

    def close(self) -> None:
        pass


def test_a_daemon_waiting_for_min_peers_says_waiting_not_running(manifest: Path, tmp_path: Path) -> None:
    """`quinkgl status` showed `running 0/N` for a daemon that had not begun round 1, waiting for --min-peers."""
    net = MemoryNetwork()
    observers = [_States(), _States()]
    daemons = [Daemon(prepare(options(manifest, tmp_path, f"p{i}", rounds=2, gossip_interval=0.2, min_peers=1)),
                      LogContext(f"p{i}"), memory_factory(net), observers[i]) for i in range(2)]

    async def both() -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in daemons)))

    assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    for d, observer in zip(daemons, observers, strict=True):
        _release(d)
        assert observer.states[:2] == ["waiting", "running"] and observer.states[-1] == "finished", observer.states
        assert "waiting" not in observer.states[1:]


def test_a_stop_while_waiting_for_min_peers_does_not_say_peers_ready(manifest: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM during the --min-peers wait logged `peers-ready have=0 want=2` before `stopped`."""
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=3, min_peers=2, min_peers_timeout=60)),
               LogContext("p0"), memory_factory(MemoryNetwork()))

    async def go() -> int:
        task = asyncio.ensure_future(d.run())
        while not any(r.getMessage().startswith("waiting-for-peers ") for r in caplog.records):
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, timeout=10)

    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(go(), timeout=60)) == ExitCode.INTERRUPTED
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert "stopped" in events and "peers-ready" not in events, events


def test_report_and_finished_line_count_the_same_bytes(manifest: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`quinkgl report`'s bytes (the metrics file's lines summed) are the `finished` line's: the final consensus has
    a line of its own, and traffic between rounds belongs to the next round."""
    from quinkgl_cli.events import FIELDS_ATTR
    from quinkgl_cli.ops.metrics_file import MetricsFile, read_metrics
    from quinkgl_cli.ops.observer import OpsObserver
    from quinkgl_cli.ops.report import summarize

    net = MemoryNetwork()
    files = [tmp_path / f"p{i}.jsonl" for i in range(2)]
    observers = []
    for path in files:
        output = MetricsFile(path)
        output.start()
        observers.append(OpsObserver({"metrics-file": output}))
    daemons = [Daemon(prepare(options(manifest, tmp_path, f"p{i}", rounds=3, gossip_interval=0.2, min_peers=1)),
                      LogContext(f"p{i}"), memory_factory(net), observers[i]) for i in range(2)]

    async def both() -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in daemons)))

    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    for d, observer in zip(daemons, observers, strict=True):
        _release(d)
        observer.close()
    lines = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage().startswith("finished ")]
    finished = {Path(str(f["final_model"])).parent.name: f for f in lines}
    for i, path in enumerate(files):
        (run,) = read_metrics(path)
        assert [r["round"] for r in run.rows] == [1, 2, 3] and len(run.consensus) == 1
        assert run.consensus[0]["bytes_sent"] > 0  # the final consensus sent models
        summary = summarize(run)
        line = finished[f"p{i}"]
        assert summary.bytes_sent == line["bytes_sent"] > 0
        assert sum(r["bytes_received"] for r in [*run.rows, *run.consensus]) == line["bytes_received"]
        assert summary.final_val_accuracy == pytest.approx(line["val_accuracy"], rel=1e-5)


def test_a_peer_left_alone_serves_what_it_trains_not_a_frozen_mean(tmp_path: Path) -> None:
    """Its partners gone (here: resumed after the pair's run, alone), a peer trains on; the served model (evaluation,
    final model) must follow that training instead of staying the mean of the last models shared, round after
    round. Without a final merge, so the served mean is still on when the pair's run ends."""
    path, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m", name="alone-test", training={
        "local_epochs": "1", "local_steps": "3", "final_consensus_steps": "0"})
    _run_pair(path, tmp_path, rounds=2)
    d = Daemon(prepare(options(path, tmp_path, "p0", rounds=5, gossip_interval=0.05)), LogContext("p0"),
               memory_factory(MemoryNetwork()))
    assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    _release(d)
    alone = [h for h in d.node.history if h["round"] > 2]
    assert [h["peers"] for h in alone] == [0, 0, 0]
    assert len({h["val_loss"] for h in alone}) == 3, [h["val_loss"] for h in alone]


def test_sighup_stops_the_daemon_as_sigterm_does(manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A closed terminal or a dropped ssh session (SIGHUP) killed the daemon outright: no stop-time final model, no
    checkpoint of the last round, no `stopped` line."""
    # Without the daemon's handler the signal reaches this no-op one (the test then times out) instead of killing pytest.
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: None)
    try:
        d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=1000, gossip_interval=0.05, checkpoint_every=5)),
                   LogContext("p0"), memory_factory(MemoryNetwork()))

        async def go() -> int:
            task = asyncio.ensure_future(d.run())
            while d.node.completed_round < 2:
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGHUP)
            return await asyncio.wait_for(task, timeout=10)

        with caplog.at_level(logging.INFO):
            assert asyncio.run(go()) == ExitCode.INTERRUPTED
    finally:
        signal.signal(signal.SIGHUP, previous)
    messages = [r.getMessage() for r in caplog.records]
    (stopped,) = [m for m in messages if m.startswith("stopped ")]
    assert "signal=SIGHUP " in stopped and f"final_model={tmp_path / 'p0' / 'final_model.safetensors'}" in stopped
    saved = CheckpointStore(tmp_path / "p0").latest()  # written at the stop: --checkpoint-every 5 had skipped it
    assert saved is not None and saved[1].meta["round"] == d.node.completed_round


def test_a_sighup_ignored_by_nohup_stays_ignored() -> None:
    from quinkgl_cli.node.process import stop_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a terminal's default (the runner may ignore it: nohup)
        assert signal.SIGHUP in stop_signals() and signal.SIGTERM in stop_signals()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_resuming_past_a_lowered_round_target_says_it_finishes_there(manifest: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Resumed at round 4 with --rounds 3: `started rounds=3`, then `finished rounds=4` with nothing in between."""
    d = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=1000, gossip_interval=0.05)), LogContext("p0"),
               memory_factory(MemoryNetwork()))

    async def stop_after_two() -> int:
        task = asyncio.ensure_future(d.run())
        while d.node.completed_round < 2:
            await asyncio.sleep(0.01)
        d._request_stop("SIGTERM")
        return await asyncio.wait_for(task, timeout=10)

    assert asyncio.run(stop_after_two()) == ExitCode.INTERRUPTED
    _release(d)
    reached = d.node.completed_round
    again = Daemon(prepare(options(manifest, tmp_path, "p0", rounds=reached - 1, gossip_interval=0.05)),
                   LogContext("p0"), memory_factory(MemoryNetwork()))
    with caplog.at_level(logging.INFO):
        caplog.clear()
        assert asyncio.run(asyncio.wait_for(again.run(), timeout=60)) == ExitCode.OK
    _release(again)
    messages = [r.getMessage() for r in caplog.records]
    (warning,) = [m for m in messages if m.startswith("rounds-reached ")]
    assert warning.startswith(f"rounds-reached completed_round={reached} rounds={reached - 1} "), warning
    assert f"finishes at round {reached}" in warning
    assert not any(m.startswith("round-end ") for m in messages)
    assert any(m.startswith(f"finished rounds={reached} ") for m in messages), messages


def test_a_peer_whose_partners_leave_during_the_final_merge_reports_the_model_it_keeps(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer a round behind is still merging when its partners, done with theirs, leave. Its merge ended without
    an evaluation, so its `finished` line reported the last round's served model (0.69 on a real swarm) while its
    final model was the partly merged one; now that model is evaluated and the line says how far the merge got."""
    path, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m", name="merge-test", training={
        "local_epochs": "1", "local_steps": "3", "final_consensus_steps": "6"})
    net = MemoryNetwork()
    daemons = [Daemon(prepare(options(path, tmp_path, f"p{i}", rounds=rounds, gossip_interval=0.2, min_peers=1)),
                      LogContext(f"p{i}"), memory_factory(net)) for i, rounds in ((0, 3), (1, 4))]

    async def both() -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in daemons)))

    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(both(), timeout=60)) == [0, 0]
    merges = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("final-consensus ")]
    assert len(merges) == 2, merges
    assert any(m.startswith("final-consensus steps=6 val_loss=") for m in merges), merges
    (short,) = [m for m in merges if "cut_short=peers-left" in m]
    assert short.startswith("final-consensus steps=") and " of=6 " in short, short
    late = daemons[1]
    assert late.loop.final_eval is not None and late.loop.final_eval["val_loss"] is not None
