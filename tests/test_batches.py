"""Batches as an outsider's loader yields them: tuples with extras, dicts, and dicts keyed otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from quinkgl_cli.batches import batch_parts
from quinkgl_cli.cli.app import main
from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import write_manifest
from quinkgl_cli.strategies.fingerprint import compute_fingerprint

SCRIPT = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Points(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(n)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"INPUT_KEY": self.x[i], "y": self.y[i]}


def build_model(manifest, **kwargs):
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def build_loaders(manifest, **kwargs):
    return DataLoader(Points(40), batch_size=8), DataLoader(Points(16), batch_size=8)
'''


class _Dicts(Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((4,), float(i)), "y": torch.tensor(i % 3)}


def test_a_dict_batch_gives_its_x_and_y_and_a_tuple_its_first_two() -> None:
    x, y = torch.zeros(2, 4), torch.ones(2)
    assert batch_parts({"x": x, "y": y}) == (x, y)
    assert batch_parts({"input": x, "target": y, "id": 3}) == (x, y)
    assert batch_parts((x, y, torch.arange(2))) == (x, y)


def test_a_dict_batch_without_known_keys_names_the_keys_it_has() -> None:
    with pytest.raises(NodeConfigError) as err:
        batch_parts({"features": torch.zeros(2), "target": torch.ones(2)})
    assert err.value.code == ExitCode.NODE
    assert "features,target" in err.value.one_line() and "x or input" in err.value.one_line()


def test_the_fingerprint_reads_dict_batches() -> None:
    fp = compute_fingerprint(DataLoader(_Dicts(), batch_size=4), num_classes=3)
    assert fp.to_body()["samples"] == "10-100"


def _manifest(tmp_path: Path, script: Path, input_shape: str = "8") -> Path:
    from quinkgl_cli.node.script import load_script

    path = tmp_path / "swarm.qgl"
    write_manifest(path, build_manifest(
        name="dicts", task_type="classification", input_shape=input_shape, output_shape="3", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(script).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    ))  # fmt: skip
    return path


@pytest.mark.parametrize(("key", "code"), [("x", 0), ("features", 7)])
def test_simulate_trains_on_dict_batches_or_says_which_keys_it_needs(
    tmp_path: Path, key: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "dicts.py"
    script.write_text(SCRIPT.replace("INPUT_KEY", key))
    manifest = _manifest(tmp_path, script)
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(script), "--peers", "2", "--rounds", "1"])
    assert int(done.value.code or 0) == code
    err = capsys.readouterr().err
    if code:
        assert err.startswith("error: a dict batch needs") and "features,y" in err and "Traceback" not in err


BROKEN_FORWARD = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if self.training:
            x = x.view(7, -1)  # a bug only training meets: the shape check runs in eval mode
        return self.fc(x)


def build_model(manifest, **kwargs):
    torch.manual_seed(0)
    return Net()


def build_loaders(manifest, **kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, WIDTH, generator=g), torch.randint(0, 3, (40,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), None
'''


@pytest.mark.parametrize(("width", "needle"), [
    (8, "RuntimeError: shape '[7, -1]' is invalid for input of size 64 at broken.py:14"),
    (5, "(inputs float32 8x5, targets int64 8; the manifest's task takes inputs of 8 per sample)"),
])
def test_a_model_failing_on_a_training_batch_is_one_line_naming_the_batch(
    tmp_path: Path, width: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_FORWARD.replace("WIDTH", str(width)))
    manifest = _manifest(tmp_path, script)
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(script), "--peers", "2", "--rounds", "1"])
    err = capsys.readouterr().err
    assert int(done.value.code or 0) == ExitCode.NODE, err
    assert err.startswith("error: the model failed on a training batch") and needle in err and "Traceback" not in err


def _dry_script(train_width: int, val_width: int, bug: bool) -> str:
    """BROKEN_FORWARD with (or without) its training-only bug, and validation data of its own width."""
    body = BROKEN_FORWARD.replace("WIDTH", str(train_width)).replace(
        ", None\n", f", DataLoader(TensorDataset(torch.randn(16, {val_width}), torch.zeros(16, dtype=torch.long)), batch_size=8)\n")
    return body if bug else body.replace("x = x.view(7, -1)", "pass")


@pytest.mark.parametrize(("train_width", "val_width", "bug", "needle"), [
    (8, 8, True, "failed on a training batch (inputs float32 8x8, targets int64 8; the manifest's task takes inputs of "
                 "8 per sample): RuntimeError: shape '[7, -1]' is invalid for input of size 64 at broken.py:14"),
    (5, 8, False, "failed on a training batch (inputs float32 8x5"),
    (8, 5, False, "failed on an evaluation batch (inputs float32 8x5"),
])
def test_the_dry_run_puts_a_batch_of_each_loader_through_the_model(
    tmp_path: Path, train_width: int, val_width: int, bug: bool, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's own one-line error, from `run --dry-run`, which reads one batch of each loader; fine data passes."""
    script = tmp_path / "broken.py"
    script.write_text(_dry_script(train_width, val_width, bug))
    manifest = _manifest(tmp_path, script)
    args = ["run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run"]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert int(done.value.code or 0) == ExitCode.NODE, err
    assert err.startswith("error: the model") and needle in err and "Traceback" not in err
    script.write_text(_dry_script(8, 8, False))
    with pytest.raises(SystemExit) as done:
        main(args)
    assert int(done.value.code or 0) == 0 and "probed=[train,val]" in capsys.readouterr().out


def test_the_probe_leaves_the_model_as_it_found_it() -> None:
    from quinkgl_cli.node.probe import probe_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4) + 3, torch.zeros(16, dtype=torch.long)), batch_size=8)
    assert probe_batches(model, torch.nn.CrossEntropyLoss(), (4,), {"train": data, "val": None, "own": []}).loaders == ["train"]
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


SEQUENCES = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def build_model(manifest, **kwargs):
    return Net()


def build_loaders(manifest, **kwargs):
    x, y = torch.randn(16, LENGTH, 4), torch.zeros(16, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=8)
'''


@pytest.mark.parametrize(("length", "warned"), [(30, True), (20, False)])
def test_the_dry_run_warns_of_inputs_of_another_shape_than_the_manifests(
    tmp_path: Path, length: int, warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GRU takes sequences of any length: a manifest for length 20 run on length-30 data passed silently."""
    script = tmp_path / "gru.py"
    script.write_text(SEQUENCES.replace("LENGTH", str(length)))
    manifest = _manifest(tmp_path, script, input_shape="20,4")
    with pytest.raises(SystemExit) as done:
        main(["run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run"])
    out = capsys.readouterr().out
    assert int(done.value.code or 0) == 0 and "dry-run-ok" in out
    line = "input-shape-mismatch manifest=[20,4] batch=[30,4] loaders=[train,val]"
    assert (line in out) == warned, out


@pytest.mark.parametrize(("length", "warned", "backend"),
                         [(30, True, "local"), (20, False, "local"), (30, True, "processes")])
def test_training_warns_once_of_inputs_of_another_shape_than_the_manifests(
    tmp_path: Path, length: int, warned: bool, backend: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Only the dry run said so: a plain `run` or `simulate` trained on length-30 sequences without a word. The
    node's training (both run it) compares its first batch once, and says it once, not every round; simulate says
    it once for the whole swarm, whose peers run in worker processes too (`--backend processes`: each worker
    printed its peers' lines; they write to this process's stderr, which `capfd` reads)."""
    script = tmp_path / "gru.py"
    script.write_text(SEQUENCES.replace("LENGTH", str(length)))
    manifest = _manifest(tmp_path, script, input_shape="20,4")
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(script), "--peers", "3", "--rounds", "2",
              "--partition", "iid", "--backend", backend, "--workers" if backend == "processes" else "--seed", "2"])
    err = capfd.readouterr().err
    assert int(done.value.code or 0) == 0, err
    lines = [line for line in err.splitlines() if "input-shape-mismatch" in line]
    # Once per run, with the number of peers that gave it (it was one line per peer: N peers, N lines).
    expected = ["WARNING - input-shape-mismatch manifest=[20,4] batch=[30,4] loaders=[train] peers=3"]
    assert lines == (expected if warned else []), err


LABELS = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_model(manifest, **kwargs):
    return nn.Linear(8, 3)


def build_loaders(manifest, **kwargs):
    x, y = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)
    y[5] = LABEL
    return DataLoader(TensorDataset(x, y), batch_size=8), None
'''


@pytest.mark.parametrize("command", ["simulate", "dry-run"])
@pytest.mark.parametrize("label", [3, -1])
def test_a_label_outside_the_tasks_classes_is_one_line_naming_it(
    tmp_path: Path, command: str, label: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cross-entropy's own 'Target 3 is out of bounds' said neither which classes the task has nor what to do."""
    script = tmp_path / "labels.py"
    script.write_text(LABELS.replace("LABEL", str(label)))
    manifest = _manifest(tmp_path, script)
    args = (["simulate", "--manifest", str(manifest), "--script", str(script), "--peers", "2", "--rounds", "1",
             "--partition", "iid"] if command == "simulate" else
            ["run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run"])
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert int(done.value.code or 0) == ExitCode.NODE, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: a training batch has label {label}, outside the task's 3 classes (labels 0..2) (make "
                      "build_loaders yield class ids 0..2 (remap the labels), or recreate the manifest with one output "
                      "per class)"], err
    assert "Traceback" not in err
