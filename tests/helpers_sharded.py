"""What the sharded-simulation tests share: the digits set-up, an in-process executor of shard workers (the Ray
backend's schedule without Ray), and the comparison of two runs peer by peer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.results import SimResult
from quinkgl_cli.sim.sharded import worker_args
from quinkgl_cli.sim.shardworker import ShardWorker
from quinkgl_cli.sim.simulator import Simulator

SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


def digits() -> tuple[PeerScript, Manifest]:
    script = load_script(SCRIPT)
    manifest = build_manifest(
        name="digits-shards", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="RandomTopology", training_params={"local_epochs": "1", "final_consensus_steps": "2"},
    )  # fmt: skip
    return script, manifest


class InProcess:
    """Shard workers called one after another in this process; handles are the values themselves."""

    def __init__(self, sim: Simulator, shards: int) -> None:
        self.shards = shards
        self.workers = [ShardWorker(*worker_args(sim, i, shards)) for i in range(shards)]

    def submit(self, shard: int, method: str, args: Sequence[Any], returns: int) -> list[Any]:
        out = getattr(self.workers[shard], method)(*args)
        return list(out) if returns > 1 else [out]

    def get(self, handles: list[Any]) -> list[Any]:
        return list(handles)

    def held_warnings(self) -> list[dict[str, Any]]:
        return []  # the workers log through this process's handlers


def differences(a: SimResult, b: SimResult) -> list[str]:
    """Where two runs differ: every round's (and the consensus phase's) per-peer metrics and traffic, exactly."""
    out = []
    phases_a = a.rounds + ([a.consensus] if a.consensus else [])
    phases_b = b.rounds + ([b.consensus] if b.consensus else [])
    if len(phases_a) != len(phases_b):
        return [f"{len(phases_a)} phases against {len(phases_b)}"]
    for ra, rb in zip(phases_a, phases_b, strict=True):
        if (ra.bytes_sent, ra.model_sends) != (rb.bytes_sent, rb.model_sends):
            out.append(f"round {ra.round} {ra.phase}: traffic {ra.bytes_sent}/{ra.model_sends} against "
                       f"{rb.bytes_sent}/{rb.model_sends}")
        if ra.peers != rb.peers:
            out.append(f"round {ra.round} {ra.phase}: peers' metrics differ ({ra.mean_accuracy} against {rb.mean_accuracy})")
    return out


def run_cli(*args: str) -> int:
    """`quinkgl ARGS` in this process: its exit code."""
    from quinkgl_cli.cli.app import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)
