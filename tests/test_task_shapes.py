"""A manifest's task shapes against the script's model: probed by `manifest create --from-script`, checked at
start-up (`run --dry-run`) so a swarm's data and a peer's model cannot disagree silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quinkgl_cli.cli.app import main
from quinkgl_cli.errors import ArchMismatch, ExitCode, UsageError
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.schema import TaskSpec
from quinkgl_cli.manifest.shapes import check_task_shapes, probe_shapes
from tests.helpers_manifest import make_manifest, write

MNIST_SCRIPT = """
import torch
from torch import nn

class MNISTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

def build_model(manifest, **kwargs):
    return MNISTNet()

def build_loaders(manifest, **kwargs):
    x = torch.zeros(4, 1, 28, 28)
    y = torch.zeros(4, dtype=torch.long)
    return [(x, y)], [(x, y)]
"""


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def mnist_net() -> nn.Module:
    namespace: dict[str, object] = {}
    exec(MNIST_SCRIPT, namespace)
    return namespace["build_model"](None)  # type: ignore[operator,no-any-return]


def test_from_script_records_the_image_shape_of_a_flattening_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist.py").write_text(MNIST_SCRIPT)
    assert run_cli("manifest", "create", "--name", "mnist", "--task-type", "class", "--label-type", "integer",
                   "--aggregation", "FedAvg", "--topology", "RandomTopology", "--from-script", "mnist.py",
                   "--output", "m.qgl") == 0  # fmt: skip
    task = json.loads((tmp_path / "m.qgl").read_text())["task"]
    assert (task["input_shape"], task["output_shape"]) == ([1, 28, 28], [10])


def test_probing_keeps_flat_inputs_flat() -> None:
    assert probe_shapes(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)), None) == ((64,), (3,))
    assert probe_shapes(mnist_net(), None) == ((1, 28, 28), (10,))
    rgb = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))
    assert probe_shapes(rgb, None) == ((3, 32, 32), (7,))
    with pytest.raises(UsageError, match="cannot infer"):
        probe_shapes(nn.Sequential(nn.Conv2d(1, 2, 3)), None)


def test_check_task_shapes() -> None:
    model = mnist_net()
    model.train()
    check_task_shapes(model, TaskSpec(type="classification", input_shape=(1, 28, 28), output_shape=(10,), label_type="integer"), "s.py")
    assert model.training  # mode restored
    check_task_shapes(model, TaskSpec(type="classification", input_shape=(784,), output_shape=(10,), label_type="integer"), "s.py")
    with pytest.raises(ArchMismatch, match="does not accept the manifest's input shape 3,32,32"):
        check_task_shapes(model, TaskSpec(type="classification", input_shape=(3, 32, 32), output_shape=(10,), label_type="integer"), "s.py")
    with pytest.raises(ArchMismatch, match="outputs 10 per sample, the manifest's output shape is 7"):
        check_task_shapes(model, TaskSpec(type="classification", input_shape=(1, 28, 28), output_shape=(7,), label_type="integer"), "s.py")
    regressor = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    check_task_shapes(regressor, TaskSpec(type="regression", input_shape=(4,), output_shape=(1,), label_type="float"), "s.py")
    embed = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(20, 2))
    check_task_shapes(embed, TaskSpec(type="classification", input_shape=(5,), output_shape=(2,), label_type="integer"), "s.py")
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(("input_shape", "output_shape", "needle"), [("3,32,32", "7", "input shape 3,32,32"), ("1,28,28", "7", "output shape is 7")])
def test_run_dry_run_refuses_a_model_that_does_not_fit_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], input_shape: str, output_shape: str, needle: str
) -> None:
    script = tmp_path / "mnist.py"
    script.write_text(MNIST_SCRIPT)
    arch = compute_arch_hash(mnist_net())  # the hash matches: only the task shapes are wrong
    manifest = write(tmp_path / "m.qgl", make_manifest(input_shape=input_shape, output_shape=output_shape, arch_hash=arch))
    base = ["run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run",
            "--checkpoint-dir", str(tmp_path / "ckpt")]  # fmt: skip
    assert run_cli(*base) == ExitCode.ARCH == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    fitting = write(tmp_path / "ok.qgl", make_manifest(input_shape="1,28,28", output_shape="10", arch_hash=arch))
    assert run_cli("run", "--manifest", str(fitting), "--script", str(script), "--trust-policy", "open", "--dry-run",
                   "--checkpoint-dir", str(tmp_path / "ckpt")) == 0  # fmt: skip


TUPLE_SCRIPT = """
from torch import nn

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 4)

    def forward(self, x):
        h = self.body(x)
        return h, h.mean(1)

def build_model(manifest, **kwargs):
    return TwoHeads()

def build_loaders(manifest, **kwargs):
    return [], None
"""


def test_from_script_says_why_a_model_returning_a_tuple_gives_no_output_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`manifest create --from-script` asked for the very flag it was given ('pass ... or --from-script')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.py").write_text(TUPLE_SCRIPT)
    assert run_cli("manifest", "create", "--name", "two", "--task-type", "class", "--label-type", "integer",
                   "--aggregation", "FedAvg", "--topology", "RandomTopology", "--from-script", "two.py",
                   "--output", "m.qgl") == ExitCode.USAGE  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two.py" in err and "tuple" in err and "--output-shape" in err
    assert not (tmp_path / "m.qgl").exists()


@pytest.mark.parametrize(("framework", "code"), [("tensorflow", ExitCode.USAGE), ("custom", ExitCode.OK)])
def test_from_script_refuses_a_tensorflow_label_on_a_pytorch_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], framework: str, code: int
) -> None:
    """The PyTorch model's hash under framework=tensorflow made a manifest that `run` then took without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist.py").write_text(MNIST_SCRIPT)
    assert run_cli("manifest", "create", "--name", "mnist", "--task-type", "class", "--label-type", "integer",
                   "--aggregation", "FedAvg", "--topology", "RandomTopology", "--from-script", "mnist.py",
                   "--model-framework", framework, "--output", "m.qgl") == code  # fmt: skip
    err = capsys.readouterr().err
    if code:
        assert err.count("\n") == 1 and "--model-framework tensorflow contradicts --from-script" in err, err
    assert (tmp_path / "m.qgl").exists() == (not code)


def test_a_regressor_giving_one_value_per_sample_probes_as_output_shape_1() -> None:
    """Its (batch,) output was taken for 'no output shape' and `--from-script` asked for --output-shape."""
    scalar = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    assert probe_shapes(scalar, None) == ((4,), (1,))
    check_task_shapes(scalar, TaskSpec(type="regression", input_shape=(4,), output_shape=(1,), label_type="float"), "s.py")
