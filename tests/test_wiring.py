"""One wiring path (node/wiring.py): `quinkgl run` and `quinkgl simulate` build a node from a peer script alike."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli.manifest.trust import load_trusted
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.core import Node
from quinkgl_cli.node.daemon import Daemon, DaemonOptions, Prepared, prepare
from quinkgl_cli.node.logs import LogContext
from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

# The digits model and data, with an optimizer and a loss of the script's own that record their use.
RECORDING_SCRIPT = """
import torch
from quinkgl_cli.peer_scripts.digits_peer_script import build_loaders, build_model

CALLS = {"build_optimizer": [], "loss_fn": 0}


def build_optimizer(manifest, model):
    CALLS["build_optimizer"].append(id(model))
    return torch.optim.Adam(model.parameters(), lr=0.0123)


def loss_fn(outputs, targets):
    CALLS["loss_fn"] += 1
    return torch.nn.functional.cross_entropy(outputs, targets)
"""


def _wired_from(node: Node, module: Any) -> None:
    assert isinstance(node.optimizer, torch.optim.Adam) and node.optimizer.param_groups[0]["lr"] == 0.0123
    assert id(node.model) in module.CALLS["build_optimizer"]  # built for this very model
    assert node.trainer.loss_fn.__wrapped__ is module.loss_fn  # type: ignore[attr-defined]  # its return checked


def _memory(p: Prepared) -> MemoryTransport:
    return MemoryTransport(MemoryNetwork(), p.options.node_id, swarm_id=p.trusted.swarm_id,
                           arch_hash=p.trusted.manifest.model.arch_hash)


def test_run_and_simulate_use_the_scripts_loss_fn_and_build_optimizer_alike(tmp_path: Path) -> None:
    script_path = tmp_path / "recording_script.py"
    script_path.write_text(RECORDING_SCRIPT)
    manifest_path = ls.digits_manifest(tmp_path / "m", name="wiring", training={"local_steps": "2"})[0]

    options = DaemonOptions.from_flags(manifest=manifest_path, script=script_path, node_id="p0", trust_policy="open",
                                       rounds=1, gossip_interval=0.05, checkpoint_dir=tmp_path / "ckpt")
    prepared = prepare(options)
    daemon = Daemon(prepared, LogContext("p0"), _memory)
    run_module = prepared.script.module
    _wired_from(daemon.node, run_module)
    before = run_module.CALLS["loss_fn"]
    assert asyncio.run(asyncio.wait_for(daemon.run(), timeout=60)) == 0
    assert run_module.CALLS["loss_fn"] > before  # trained with it
    for held in prepared.locks:
        held.release()

    script = load_script(script_path)
    manifest = load_trusted(manifest_path, "open", (), None).manifest
    sim = Simulator(script, manifest, SimConfig(peers=2, rounds=1))
    sim.build()
    for node in sim.nodes:
        _wired_from(node, script.module)
    before = script.module.CALLS["loss_fn"]
    sim.run()
    assert script.module.CALLS["loss_fn"] > before
