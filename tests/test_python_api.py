"""The guide's Python API (`quinkgl.manifest`, `quinkgl.models`) is shipped and agrees with the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from torch import nn

import quinkgl
import quinkgl_cli
from quinkgl.manifest import compute_arch_hash
from quinkgl.models import PyTorchModel
from quinkgl_cli.cli.app import main
from tests.test_task_shapes import MNIST_SCRIPT, mnist_net

REPO = Path(__file__).resolve().parents[1]


def test_the_guide_imports_work_and_are_ours() -> None:
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash as ours

    assert compute_arch_hash is ours and quinkgl.__version__ == quinkgl_cli.__version__
    assert compute_arch_hash(mnist_net()).startswith("sha256:")


def test_the_guides_inline_command_runs_without_torch_until_called(tmp_path: Path) -> None:
    (tmp_path / "my_model.py").write_text(MNIST_SCRIPT.replace("def build_model", "MyModel = MNISTNet\ndef build_model"))
    code = (
        "import sys\nfrom quinkgl.manifest import compute_arch_hash\nassert 'torch' not in sys.modules\n"
        "from my_model import MyModel\nprint(compute_arch_hash(MyModel()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == compute_arch_hash(mnist_net())


def test_data_schema_hash_matches_what_manifest_create_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist.py").write_text(MNIST_SCRIPT)
    with pytest.raises(SystemExit) as done:
        main(["manifest", "create", "--name", "mnist", "--task-type", "class", "--label-type", "integer", "--aggregation",
              "FedAvg", "--topology", "RandomTopology", "--from-script", "mnist.py", "--output", "m.qgl"])  # fmt: skip
    assert done.value.code in (0, None)
    written = json.loads((tmp_path / "m.qgl").read_text())
    wrapper = PyTorchModel(mnist_net())
    assert wrapper.get_data_schema_hash() == written["data_schema_hash"]
    assert wrapper.get_arch_hash() == written["model"]["arch_hash"]
    assert (wrapper.get_input_shape(), wrapper.get_output_shape()) == ((1, 28, 28), (10,))
    assert PyTorchModel(mnist_net(), label_type="one_hot").get_data_schema_hash() != written["data_schema_hash"]


def test_wrapper_refuses_what_is_not_a_model_or_a_known_type() -> None:
    with pytest.raises(TypeError):
        PyTorchModel(object())
    with pytest.raises(ValueError, match="task_type"):
        PyTorchModel(nn.Linear(2, 2), task_type="clustering")
    with pytest.raises(ValueError, match="label_type"):
        PyTorchModel(nn.Linear(2, 2), label_type="text")
    assert PyTorchModel(nn.Linear(2, 3), task_type="regr", label_type="float").get_task().type == "regression"


def test_the_distribution_ships_the_quinkgl_package() -> None:
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    found = find_packages(where=str(REPO), **config["tool"]["setuptools"]["packages"]["find"])
    assert "quinkgl" in found and "quinkgl_cli" in found and not any(p.startswith("tests") for p in found)
