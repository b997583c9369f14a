"""The guide's mode A: `quinkgl run --data NAME` with a model and data set quinkgl ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quinkgl_cli.cli.app import main


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def create(tmp_path: Path, data: str) -> Path:
    out = tmp_path / f"{data}.qgl"
    assert run_cli("manifest", "create", "--name", data, "--data", data, "--task-type", "class", "--label-type", "integer",
                   "--aggregation", "FedAvg", "--topology", "RandomTopology", "--output", str(out)) == 0  # fmt: skip
    return out


def test_digits_runs_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = create(tmp_path, "digits")
    assert json.loads(manifest.read_text())["task"]["input_shape"] == [64]
    assert run_cli("run", "--manifest", str(manifest), "--data", "digits", "--trust-policy", "open", "--dry-run",
                   "--checkpoint-dir", str(tmp_path / "ckpt")) == 0  # fmt: skip
    assert "dry-run-ok" in capsys.readouterr().out


def test_downloadable_data_sets_say_what_is_missing_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = create(tmp_path, "mnist")
    assert json.loads(manifest.read_text())["task"]["input_shape"] == [1, 28, 28]
    capsys.readouterr()
    code = run_cli("run", "--manifest", str(manifest), "--data", "mnist", "--trust-policy", "open", "--dry-run",
                   "--script-arg", f"data_root={tmp_path / 'nodata'}", "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 7 and err.count("\n") == 1, err
    # Without torchvision it says to install it; with it, that the files are missing and how to fetch them.
    assert "torchvision is not installed" in err or ("MNIST not found" in err and "download=true" in err), err
    assert not (tmp_path / "nodata").exists() or not any((tmp_path / "nodata").rglob("*.gz"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "imagenet"], "is not a data set quinkgl ships"),
        ([], "needs either --script FILE or --data NAME"),
        (["--data", "digits", "--script", "s.py"], "exclude each other"),
    ],
)
def test_data_flag_errors(tmp_path: Path, args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("run", "--manifest", str(tmp_path / "m.qgl"), *args) == 1
    assert needle in capsys.readouterr().err
