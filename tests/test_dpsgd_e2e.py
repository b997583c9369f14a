"""Real `quinkgl run` daemons on loopback under privacy mode dp_sgd, and `quinkgl simulate`'s node code with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls

ROUNDS = 4
INTERVAL = 0.6


def dp_sgd_manifest(workdir: Path, epsilon: float) -> Path:
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest
    from quinkgl_cli.node.script import load_script

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(
        name="digits-dpsgd", task_type="classification", input_shape=(64,), output_shape=(10,),
        label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(load_script(ls.DIGITS_SCRIPT).build_model(None)),
        aggregation="FedAvg", topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "1"},
        privacy_params={"mode": "dp_sgd", "dp_total_epsilon": epsilon},
    )
    path = workdir / "dpsgd.qgl"
    write_manifest(path, sign_manifest(manifest, keys.generate()), overwrite=True)
    return path


@pytest.mark.e2e
def test_dp_sgd_daemons_spend_at_most_their_budget_and_finish(tmp_path: Path) -> None:
    manifest = dp_sgd_manifest(tmp_path / "m", 8.0)
    peers = ls.start_swarm(tmp_path, manifest, 2, ROUNDS, INTERVAL, "iid", extra=["--log-level", "info"])
    try:
        ls.ensure_started(peers)
        codes = ls.wait_all(peers, timeout=180)
    finally:
        ls.stop_all(peers)
    logs = {p.name: p.text() for p in peers}
    assert codes == [0, 0], {n: t[-2000:] for n, t in logs.items()}
    for text in logs.values():
        assert "dp-sgd-enabled" in text and "sampling=poisson" in text and "fingerprint" not in text.split("dp-sgd")[0]
        spent = [float(m.group(1)) for m in re.finditer(r"round-end .*dp_epsilon_spent=([0-9.]+)", text)]
        remaining = [float(m.group(1)) for m in re.finditer(r"round-end .*dp_epsilon_remaining=([0-9.]+)", text)]
        assert len(spent) == ROUNDS and spent == sorted(spent) and 0 < spent[0] and spent[-1] <= 8.0, spent
        assert spent[-1] > 7.0 and remaining[-1] == pytest.approx(8.0 - spent[-1], abs=1e-4)
        assert "dp-budget-exhausted" not in text and "finished" in text


def test_simulated_swarm_with_a_fedavg_server_trains_under_dp_sgd(tmp_path: Path) -> None:
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.node.script import load_script
    from quinkgl_cli.sim.simulator import SimConfig, Simulator

    manifest = load_manifest(dp_sgd_manifest(tmp_path, 4.0)).manifest
    for mode in ("gossip", "fedavg"):
        sim = Simulator(load_script(ls.DIGITS_SCRIPT), manifest, SimConfig(peers=4, rounds=2, mode=mode, seed=1, clients_per_round=3))  # type: ignore[arg-type]
        result = sim.run()
        assert len(result.rounds) == 2 and result.final.mean_accuracy is not None
        clients = [n for n in sim.nodes if n.trainer.dpsgd is not None]
        assert len(clients) == 4  # every data-holding peer trains under DP-SGD; the FedAvg server holds no data
        assert sim.server is None or sim.server.trainer.dpsgd is None
        spent = [n.history[-1]["dp_epsilon_spent"] for n in clients]
        assert all(0 <= e <= 4.0 for e in spent) and max(spent) > 0, spent  # fedavg: a client not drawn spent none


@pytest.mark.e2e
def test_run_refuses_a_budget_that_cannot_cover_its_rounds_with_exit_7(tmp_path: Path) -> None:
    import subprocess

    manifest = dp_sgd_manifest(tmp_path / "m", 0.01)
    cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, "peer-1", ls.free_port(), 1000, 1.0, [], tmp_path / "ckpt",
                         {})
    done = subprocess.run(cmd, capture_output=True, text=True, env=ls.child_env(tmp_path / "home"), timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 7, done.stderr[-2000:]
    error = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "DP-SGD budget cannot cover the run: epsilon 0.01" in error[0]
    assert "1000 rounds x" in error[0] and "started" not in done.stdout
