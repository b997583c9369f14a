"""Real `quinkgl run` daemons on loopback with compression and local DP switched on in the signed manifest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls

pytestmark = pytest.mark.e2e

ROUNDS = 10
INTERVAL = 0.6


def compressed_dp_manifest(workdir: Path) -> Path:
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest
    from quinkgl_cli.node.script import load_script

    workdir.mkdir(parents=True, exist_ok=True)
    key = keys.generate()
    manifest = build_manifest(
        name="digits-compressed", task_type="classification", input_shape=(64,), output_shape=(10,),
        label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(load_script(ls.DIGITS_SCRIPT).build_model(None)),
        aggregation="FedAvg", topology="FullTopology",
        training_params={"local_epochs": "2", "final_consensus_steps": "1"},
        compression_params={"top_k_ratio": "0.1", "quantize_bits": "8", "lossless": "zstd"},
        # Per-round epsilon high enough to keep this tiny-data model learnable: the test is about the mechanics.
        privacy_params={"dp_epsilon": "1000", "dp_clip_norm": "5", "dp_total_epsilon": "300000"},
    )
    path = workdir / "compressed.qgl"
    write_manifest(path, sign_manifest(manifest, key), overwrite=True)
    return path


def test_compressed_private_daemons_learn_and_log_ratio_and_budget(tmp_path: Path) -> None:
    manifest = compressed_dp_manifest(tmp_path / "m")
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
        assert swarm_acc > alone + 0.15, (p.name, alone, swarm_acc)
        ends = [ln for ln in text.splitlines() if "round-end" in ln]
        assert len(ends) >= ROUNDS
        ratios = [float(m.group(1)) for m in re.finditer(r"compression_ratio_sent=([0-9.]+)", text)]
        assert ratios and max(ratios) > 5, ratios  # deltas after the first (exact) contact
        spent = [float(m.group(1)) for m in re.finditer(r"dp_epsilon_spent=([0-9.]+)", text)]
        assert len(spent) >= ROUNDS and spent == sorted(spent) and spent[-1] > spent[0] > 0
        assert "updates_rejected=0" in text and "update-dropped" not in text
        assert "dp-enabled" in text and "affordable_rounds=12" in text and "dp-budget-exhausted" not in text
