"""`build_optimizer` returning (optimizer, scheduler): the check of what it returned, a step per round, and the
scheduler's state through a checkpoint and a resumed daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.checkpoint import CheckpointStore
from quinkgl_cli.node.daemon import Daemon, DaemonOptions, prepare
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.node.lrschedule import check_training, load_scheduler_state, scheduler_state
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

WHERE = "build_optimizer in s.py"


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


class _Decay:
    """A stateful lr_lambda: LambdaLR checkpoints a callable object's attributes."""

    def __init__(self, extra: Any) -> None:
        self.extra = extra

    def __call__(self, epoch: int) -> float:
        return 0.9 ** epoch


def test_what_build_optimizer_returned_is_checked_in_one_line() -> None:
    opt = _sgd()
    assert check_training(opt, WHERE) == (opt, None) and check_training((opt, None), WHERE) == (opt, None)
    step = StepLR(opt, 1)
    assert check_training((opt, step), WHERE) == (opt, step)
    assert check_training([opt, LambdaLR(opt, lambda e: 0.5 ** e)], WHERE).scheduler is not None
    assert check_training((opt, LambdaLR(opt, _Decay(3))), WHERE).scheduler is not None
    cases: list[tuple[Any, str]] = [
        ("sgd", "returned str, not an optimizer or (optimizer, scheduler)"),
        ((opt, 3), "returned (SGD, int): the second item is not a torch.optim.lr_scheduler scheduler"),
        ((opt, step, 1), "returned a tuple (SGD, StepLR, int), not an optimizer"),
        ((opt, StepLR(_sgd(), 1)), "returned a StepLR of another optimizer than the SGD it returned"),
        ((opt, ReduceLROnPlateau(opt)), "ReduceLROnPlateau scheduler, which needs a metric at each step"),
        ((opt, LambdaLR(opt, _Decay(object()))), "LambdaLR scheduler's state lr_lambdas[0].extra is a object, which a "
                                                 "checkpoint cannot hold without pickle"),
    ]
    for value, needle in cases:
        with pytest.raises(NodeConfigError) as refused:
            check_training(value, WHERE)
        assert refused.value.code == ExitCode.NODE and needle in refused.value.one_line(), refused.value.one_line()
        assert refused.value.one_line().startswith(WHERE) and "\n" not in refused.value.one_line()


def test_the_scheduler_state_goes_through_json_and_must_match() -> None:
    import json

    opt = _sgd()
    sched = StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(scheduler_state(sched)))
    fresh_opt = _sgd()
    fresh = StepLR(fresh_opt, step_size=2, gamma=0.5)
    load_scheduler_state(fresh, saved)
    assert fresh.last_epoch == 3 and fresh.state_dict() == sched.state_dict()
    with pytest.raises(ValueError, match="holds a StepLR scheduler's state, build_optimizer returns a LambdaLR"):
        load_scheduler_state(LambdaLR(_sgd(), lambda e: 1.0), saved)
    with pytest.raises(ValueError, match="holds a StepLR scheduler's state and build_optimizer returns none"):
        load_scheduler_state(None, saved)
    with pytest.raises(ValueError, match="holds no learning-rate scheduler and build_optimizer returns a StepLR"):
        load_scheduler_state(fresh, None)
    load_scheduler_state(None, None)


SCHEDULED = """

def build_optimizer(manifest, model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.08, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _key, _pub, _swarm = ls.digits_manifest(tmp_path_factory.mktemp("m"), name="sched-test",
                                                  training={"local_epochs": "1", "local_steps": "2"})
    return path


def _daemon(manifest: Path, tmp: Path, script: Path, rounds: int) -> Daemon:
    options = DaemonOptions.from_flags(manifest=manifest, script=script, node_id="p0", trust_policy="open",
                                       rounds=rounds, gossip_interval=0.05, checkpoint_dir=tmp / "ck",
                                       script_args={"shard": "0", "num_shards": "2"})
    prepared = prepare(options)
    return Daemon(prepared, LogContext("p0"), lambda p: MemoryTransport(MemoryNetwork(), "p0", swarm_id=p.trusted.swarm_id,
                                                                        arch_hash=p.trusted.manifest.model.arch_hash))


def _run(d: Daemon) -> None:
    assert asyncio.run(asyncio.wait_for(d.run(), timeout=60)) == ExitCode.OK
    for lock in d.prepared.locks:
        lock.release()


def test_the_scheduler_steps_once_a_round_and_resumes_where_it_was(manifest: Path, tmp_path: Path) -> None:
    script = tmp_path / "scheduled.py"
    script.write_text(ls.DIGITS_SCRIPT.read_text() + SCHEDULED)
    first = _daemon(manifest, tmp_path, script, rounds=2)
    _run(first)
    assert first.node.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.08 * 0.5 ** 2)
    saved = CheckpointStore(tmp_path / "ck").latest()
    assert saved is not None
    assert saved[1].meta["scheduler"]["type"] == "StepLR" and saved[1].meta["scheduler"]["state"]["last_epoch"] == 2
    # Restarted with a higher round target: the schedule goes on from round 2's rate, not from the start.
    again = _daemon(manifest, tmp_path, script, rounds=3)
    _run(again)
    sched = again.node.trainer.scheduler
    assert sched is not None and sched.last_epoch == 3
    assert again.node.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.08 * 0.5 ** 3)
    # The same checkpoint with a script that has no scheduler is refused, not resumed on a silently reset rate.
    plain = _daemon(manifest, tmp_path, ls.DIGITS_SCRIPT, rounds=4)
    with pytest.raises(NodeConfigError, match="holds a StepLR scheduler's state and build_optimizer returns none"):
        asyncio.run(plain.run())
    for lock in plain.prepared.locks:
        lock.release()


def test_dry_run_names_the_scheduler_or_refuses_what_came_back(manifest: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from quinkgl_cli.cli.app import main

    script = tmp_path / "scheduled.py"
    args = ["run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run"]
    for body, code, needle in [(SCHEDULED, 0, "scheduler=StepLR"),
                               (SCHEDULED.replace("return optimizer, torch", "return optimizer, 0.5, torch"), 7,
                                "error: build_optimizer in scheduled.py returned a tuple (SGD, float, StepLR), not an "
                                "optimizer or (optimizer, scheduler)")]:
        script.write_text(ls.DIGITS_SCRIPT.read_text() + body)
        with pytest.raises(SystemExit) as done:
            main(args)
        out = capsys.readouterr()
        assert int(done.value.code or 0) == code and needle in (out.err if code else out.out), out
