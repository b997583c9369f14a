"""Real `quinkgl run` daemons on loopback gossiping with CHOCO over IPv8: the estimates' increments travel as the
compressed payload type, the swarm learns beyond what each peer reaches alone, and no increment is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls

pytestmark = pytest.mark.e2e

ROUNDS = 8
INTERVAL = 0.6


def choco_manifest(workdir: Path) -> Path:
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest
    from quinkgl_cli.node.script import load_script

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(
        name="digits-choco", task_type="classification", input_shape=(64,), output_shape=(10,),
        label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(load_script(ls.DIGITS_SCRIPT).build_model(None)),
        aggregation="FedAvg", topology="ExpanderTopology",
        training_params={"local_epochs": "2", "final_consensus_steps": "2"},
        compression_params={"mode": "choco", "top_k_ratio": "0.1", "quantize_bits": "8"},
    )
    path = workdir / "choco.qgl"
    write_manifest(path, sign_manifest(manifest, keys.generate()), overwrite=True)
    return path


def test_choco_daemons_learn_over_ipv8_on_compressed_increments(tmp_path: Path) -> None:
    manifest = choco_manifest(tmp_path / "m")
    peers = ls.start_swarm(tmp_path, manifest, 3, ROUNDS, INTERVAL, "shards:3", extra=["--log-level", "info"])
    try:
        solo = {p.name: ls.train_alone(manifest, ls.DIGITS_SCRIPT, p.script_args, ROUNDS, node_id=p.name) for p in peers}
        codes = ls.wait_all(peers, timeout=180)
    finally:
        ls.stop_all(peers)
    logs = {p.name: p.text() for p in peers}
    assert codes == [0, 0, 0], {n: t[-2000:] for n, t in logs.items()}
    for p in peers:
        text = logs[p.name]
        swarm_acc, alone = p.finished_accuracy(), solo[p.name].val_accuracy
        assert swarm_acc is not None and alone is not None
        assert swarm_acc > alone + 0.1, (p.name, alone, swarm_acc)
        ratios = [float(m.group(1)) for m in re.finditer(r"compression_ratio_sent=([0-9.]+)", text)]
        assert ratios and max(ratios) > 5, ratios
        assert "aggregated models" in text and "updates_rejected=0" in text
