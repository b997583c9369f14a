"""`quinkgl simulate`'s flags and warnings: what a user trying the README's examples meets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quinkgl_cli.cli.app import main
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import write_manifest
from quinkgl_cli.node.script import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "swarm.qgl"
    write_manifest(path, build_manifest(
        name="digits-sim", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(SCRIPT).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    ))  # fmt: skip
    return path


def simulate(manifest: Path, *extra: str) -> list[str]:
    return ["simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "4", "--rounds", "1", *extra]


def test_fedavg_mode_works_below_ten_peers(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*simulate(manifest, "--mode", "fedavg")) == 0
    assert "final mean_accuracy=" in capsys.readouterr().out
    assert run_cli(*simulate(manifest, "--mode", "fedavg", "--clients-per-round", "5")) == 1  # explicit: still checked
    assert "--clients-per-round 5" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--plot", "--json"])
def test_an_output_in_a_missing_directory_is_an_io_error_before_anything_runs(
    manifest: Path, tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing-dir" / "x.png"
    # The manifest does not exist either: the output path is refused first, before any loading.
    assert run_cli(*simulate(tmp_path / "absent.qgl", flag, str(target))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} ") and "does not exist" in err


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        (["--aggregation", "MultiKrum"], True),
        (["--aggregation", "Krum", "--byzantine-f", "0"], True),
        (["--aggregation", "MultiKrum", "--byzantine-f", "1"], False),
        (["--aggregation", "TrimmedMean", "--aggregation-param", "trim_ratio=0.3"], False),
        (["--aggregation", "FedAvg"], False),
    ],
)
def test_a_robust_rule_told_to_tolerate_no_attacker_says_so(
    manifest: Path, extra: list[str], warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(*simulate(manifest, "--attackers", "1:signflip", *extra)) == 0
    err = capsys.readouterr().err
    assert ("tolerates f=0 Byzantine peers, but 1 attack" in err) is warned, err


def test_round_and_final_lines_carry_the_validation_loss(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A regression swarm has no accuracy: the loss is the only learning figure simulate can show for it.
    assert run_cli(*simulate(manifest)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("round=", "final "))]
    assert len(lines) == 2 and all(re.search(r" val_loss=\d+\.\d{4} ", ln) for ln in lines)


REGRESSION_SCRIPT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
def build_model(manifest, **kw):
    return nn.Linear(8, 3)
def build_loaders(manifest, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    y = x[:, :3] * 0.5  # three float targets per sample
    return DataLoader(TensorDataset(x, y), batch_size=20), DataLoader(TensorDataset(x[:40], y[:40]), batch_size=40)
"""


def _regression_swarm(tmp_path: Path) -> tuple[Path, Path]:
    """REGRESSION_SCRIPT and a manifest for it: (script, manifest)."""
    script = tmp_path / "regr.py"
    script.write_text(REGRESSION_SCRIPT)
    path = tmp_path / "regr.qgl"
    write_manifest(path, build_manifest(
        name="regr-sim", task_type="regression", input_shape="8", output_shape="3", label_type="float",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(script).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    ))  # fmt: skip
    return script, path


def test_multi_output_regression_targets_are_not_split_as_one_hot_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows of float targets look like one-hot labels; a label split would cut the data by their argmax."""
    script, path = _regression_swarm(tmp_path)
    args = ["simulate", "--manifest", str(path), "--script", str(script), "--peers", "3", "--rounds", "1"]
    assert run_cli(*args, "--partition", "shards:2") == 7
    err = capsys.readouterr().err
    assert "splits by class label" in err and "regression" in err
    assert run_cli(*args) == 0


def test_labelflip_on_a_regression_task_says_it_has_no_labels_not_which_partition_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "use --partition iid ..." while iid was in use."""
    script, path = _regression_swarm(tmp_path)
    assert run_cli("simulate", "--manifest", str(path), "--script", str(script), "--peers", "3", "--rounds", "1",
                   "--partition", "iid", "--attackers", "1:labelflip") == 7  # fmt: skip
    err = capsys.readouterr().err
    assert err == ("error: --attackers N:labelflip flips class labels, and a regression task has none (attack a "
                   "regression task's shared models instead (signflip, gaussian, scale, alie or ipm), or use labelflip "
                   "on a classification task)\n"), err


BINARY_SCRIPT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
def build_model(manifest, **kw):
    return nn.Linear(4, 1)
def build_loaders(manifest, **kw):
    x = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, :1] > 0).float()  # one float column: a BCEWithLogitsLoss target
    return DataLoader(TensorDataset(x, y), batch_size=20), DataLoader(TensorDataset(x, y), batch_size=40)
def loss_fn(outputs, targets):
    return nn.functional.binary_cross_entropy_with_logits(outputs, targets)
"""


def test_a_binary_classifier_with_float_labels_is_split_by_label(tmp_path: Path) -> None:
    """Float labels of a classification task are class ids (0.0 / 1.0); only a regression task has none."""
    script = tmp_path / "binary.py"
    script.write_text(BINARY_SCRIPT)
    path = tmp_path / "binary.qgl"
    write_manifest(path, build_manifest(
        name="binary-sim", task_type="classification", input_shape="4", output_shape="1", label_type="float",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(script).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    ))  # fmt: skip
    assert run_cli("simulate", "--manifest", str(path), "--script", str(script), "--peers", "2", "--rounds", "1",
                   "--partition", "shards:1") == 0  # fmt: skip


SLOW_BUILD = (
    "import pathlib, time\n"
    "def build_model(manifest, **kw):\n"
    "    return None\n"
    "def build_loaders(manifest, **kw):\n"
    "    pathlib.Path(__file__).with_name('building').touch()\n"
    "    time.sleep(60)\n"
)


def test_sigterm_ends_simulate_as_ctrl_c_does(manifest: Path, tmp_path: Path) -> None:
    """SIGTERM (kill, a batch scheduler's time limit) ended simulate by the signal's default: 143 in a shell, where
    Ctrl-C gives 130 and `interrupted`, the code README's exit-code table lists."""
    import subprocess
    import sys
    import time

    script = tmp_path / "slow.py"
    script.write_text(SLOW_BUILD)
    proc = subprocess.Popen([sys.executable, "-m", "quinkgl_cli", "simulate", "--manifest", str(manifest), "--script",
                             str(script), "--peers", "2", "--rounds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "building").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "build_loaders never started"
            time.sleep(0.05)
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out[-1000:], err[-1500:])
    assert err.strip().splitlines()[-1] == "interrupted by SIGTERM", err[-1500:]
