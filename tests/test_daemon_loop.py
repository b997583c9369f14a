"""The daemon's asyncio driver in one process over the memory transport: cadence, early wake, stop, crash paths."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.checkpoint import CheckpointStore
from quinkgl_cli.node.daemon import Daemon, DaemonOptions, Prepared, prepare, run_daemon
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

@pytest.fixture(autouse=True)
def _drop_daemon_log_handlers() -> Iterator[None]:
    """setup_logging installs a root handler, as a daemon process should; tests must not leak it to later tests."""
    yield
    from quinkgl_cli.node.logs import FlushingHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, FlushingHandler):
            root.removeHandler(handler)


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
    return DaemonOptions(**base)  # type: ignore[arg-type]


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
        return await asyncio.wait_for(task, timeout=10)

    with caplog.at_level(logging.INFO):
        assert asyncio.run(go()) == ExitCode.INTERRUPTED
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("alone ") for m in messages) == 1  # once, not every round
    assert any(m.startswith("stopping signal=SIGTERM") for m in messages)
    saved = CheckpointStore(tmp_path / "p0").latest()
    assert saved is not None and saved[1].meta["round"] == d.node.completed_round


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
                                                    {"round": 2, "swarm_id": swarm, "optimizer": {}}))
    with pytest.raises(NodeConfigError, match="does not fit this model") as exc:
        run_daemon(options(manifest, tmp_path, "p0"), transport_factory=memory_factory(MemoryNetwork()))
    assert "--no-resume" in exc.value.one_line()
