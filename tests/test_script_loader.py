"""Peer script loading: hooks found, failures named with the right exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quinkgl_cli.errors import ExitCode, IOFailure, NodeConfigError
from quinkgl_cli.node.script import DEFAULT_LR, load_script

GOOD = """
import torch
def build_model(manifest, **kw):
    return torch.nn.Linear(int(kw.get("d", 3)), 2)
def build_loaders(manifest, **kw):
    return [(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))], []
def on_round_end(round_idx, metrics):
    pass
"""


def write(tmp_path: Path, text: str, name: str = "peer_script.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_script_hooks_and_default_optimizer(tmp_path: Path) -> None:
    script = load_script(write(tmp_path, GOOD))
    model = script.build_model(None, d="3")
    assert isinstance(model, torch.nn.Linear) and model.in_features == 3
    train, val, _ = script.build_loaders(None)
    assert len(train) == 1 and val == []
    opt = script.build_optimizer(None, model)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == DEFAULT_LR
    assert script.on_round_end is not None and script.on_peer_discovered is None


def test_two_scripts_with_same_stem_do_not_collide(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_script(write(tmp_path / "a", GOOD))
    two = load_script(write(tmp_path / "b", GOOD.replace('"d", 3', '"d", 5')))
    assert one.module is not two.module
    assert two.build_model(None).in_features == 5 and one.build_model(None).in_features == 3


def test_missing_file_is_io_error(tmp_path: Path) -> None:
    with pytest.raises(IOFailure) as info:
        load_script(tmp_path / "nope.py")
    assert info.value.code == ExitCode.IO


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("def build_loaders(m, **k):\n    return [], []\n", "build_model"),
        ("build_model = 3\ndef build_loaders(m, **k):\n    return [], []\n", "build_model"),
        ("def build_model(:\n", "syntax error at line 1"),
        ("import no_such_module_qgl\n", "ModuleNotFoundError"),
        (GOOD + "on_peer_discovered = 'x'\n", "on_peer_discovered is not callable"),
    ],
)
def test_bad_scripts_are_node_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(NodeConfigError) as info:
        load_script(write(tmp_path, text))
    assert info.value.code == ExitCode.NODE
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_hook_results_are_checked(tmp_path: Path) -> None:
    script = load_script(write(tmp_path, GOOD + "def build_optimizer(m, model):\n    return 'sgd'\n"))
    with pytest.raises(NodeConfigError, match=r"returned str, not an optimizer or \(optimizer, scheduler\)"):
        script.build_optimizer(None, script.build_model(None))
    bad = load_script(write(tmp_path, "def build_model(m, **k):\n    return 1\ndef build_loaders(m, **k):\n    return 1\n", "x.py"))
    with pytest.raises(NodeConfigError, match="not a torch.nn.Module"):
        bad.build_model(None)
    with pytest.raises(NodeConfigError, match=r"must return \(train_loader, val_loader\)"):
        bad.build_loaders(None)


def test_hook_exception_becomes_one_line_error(tmp_path: Path) -> None:
    script = load_script(write(tmp_path, "def build_model(m, **k):\n    raise KeyError('data_root')\ndef build_loaders(m, **k):\n    return [], []\n"))
    with pytest.raises(NodeConfigError, match="build_model in peer_script.py failed: KeyError"):
        script.build_model(None)


_EXITING = """
import sys
def build_model(m, **k):
    sys.exit(3)
def build_loaders(m, **k):
    raise SystemExit("no data")
def build_optimizer(m, model):
    raise GeneratorExit
def on_round_end(round_idx, metrics):
    pass
"""


def test_sys_exit_in_a_hook_is_a_node_config_error(tmp_path: Path) -> None:
    script = load_script(write(tmp_path, _EXITING))
    for call, needle in (
        (lambda: script.build_model(None), "build_model in peer_script.py failed: it called sys.exit(3)"),
        (lambda: script.build_loaders(None), "build_loaders in peer_script.py failed: it called sys.exit('no data')"),
        (lambda: script.build_optimizer(None, torch.nn.Linear(1, 1)), "build_optimizer in peer_script.py failed: GeneratorExit"),
    ):
        with pytest.raises(NodeConfigError) as info:
            call()
        assert needle in info.value.one_line() and info.value.code == ExitCode.NODE


def test_sys_exit_at_import_is_a_node_config_error(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match=r"failed to import: it called sys.exit\(0\)"):
        load_script(write(tmp_path, "import sys\nsys.exit(0)\n"))


def test_ctrl_c_in_a_hook_passes_through(tmp_path: Path) -> None:
    script = load_script(write(tmp_path, "def build_model(m, **k):\n    raise KeyboardInterrupt\ndef build_loaders(m, **k):\n    return [], []\n"))
    with pytest.raises(KeyboardInterrupt):
        script.build_model(None)


def test_arch_hash_of_an_exiting_script_exits_7(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from quinkgl_cli.cli.app import main

    write(tmp_path, _EXITING)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["manifest", "arch-hash", "--script", "peer_script.py"])
    assert done.value.code == 7
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: build_model in peer_script.py failed: it called sys.exit(3)")


# --- the bundled torchvision scripts, as far as they can be tested offline -------------------------------------
import sys  # noqa: E402
import types  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "peer_scripts"


class _FakeDataset(torch.utils.data.Dataset):
    def __init__(self, root: str, download: bool, train: bool, transform: object, present: bool, calls: list) -> None:
        calls.append({"root": root, "download": download, "train": train})
        if not present:
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self.targets = torch.arange(60 if train else 20) % 10
        self.shape = (1, 28, 28)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(self.shape), int(self.targets[i])


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, present: bool) -> list:
    calls: list = []
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")

    def factory(root: str, download: bool = False, train: bool = True, transform: object = None) -> _FakeDataset:
        return _FakeDataset(root, download, train, transform, present, calls)

    datasets.MNIST = factory  # type: ignore[attr-defined]
    datasets.CIFAR10 = factory  # type: ignore[attr-defined]
    transforms.Compose = lambda items: items  # type: ignore[attr-defined]
    transforms.ToTensor = lambda: None  # type: ignore[attr-defined]
    transforms.Normalize = lambda *a: None  # type: ignore[attr-defined]
    tv.datasets, tv.transforms = datasets, transforms  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
    return calls


@pytest.mark.parametrize(("name", "params"), [("mnist_peer_script.py", 109_386), ("cifar10_peer_script.py", 188_810)])
def test_torchvision_scripts_build_models_without_torchvision(name: str, params: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    script = load_script(SCRIPTS / name)
    model = script.build_model(None)
    assert sum(p.numel() for p in model.parameters()) == params
    with pytest.raises(NodeConfigError, match="torchvision is not installed"):
        script.build_loaders(None)


def test_missing_data_is_named_and_nothing_downloads_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_torchvision(monkeypatch, present=False)
    script = load_script(SCRIPTS / "mnist_peer_script.py")
    with pytest.raises(NodeConfigError, match=r"MNIST not found under /nowhere .*download=true"):
        script.build_loaders(None, data_root="/nowhere")
    assert calls and all(c["download"] is False for c in calls)


def test_torchvision_script_shards_the_training_set(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_torchvision(monkeypatch, present=True)
    script = load_script(SCRIPTS / "mnist_peer_script.py")
    seen: list[set[int]] = []
    for shard in range(2):
        train, val, _ = script.build_loaders(None, shard=str(shard), num_shards="2", partition="shards:5", download="true")
        labels = {int(y) for _, ys in train for y in ys}
        seen.append(labels)
        assert len(train.dataset) == 30 and len(val.dataset) == 20
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 10
    assert all(c["download"] is True for c in calls)


def test_example_manifest_verifies_and_fits_the_digits_script() -> None:
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.trust import load_trusted

    root = Path(__file__).resolve().parents[1]
    pub = (root / "manifests" / "digits-example.pub").read_text().strip()
    trusted = load_trusted(root / "manifests" / "digits-example.qgl", "pinned", [pub])
    model = load_script(root / "peer_scripts" / "digits_peer_script.py").build_model(trusted.manifest)
    assert compute_arch_hash(model) == trusted.manifest.model.arch_hash
    # It is the defaults' showcase: the settings the learning table measures as "gossip, quinkgl defaults".
    from quinkgl_cli.manifest.schema import CompressionSpec, PrivacySpec, TrainingSpec

    m = trusted.manifest
    assert (m.training, m.compression, m.privacy) == (TrainingSpec(), CompressionSpec(), PrivacySpec())
    assert (m.aggregation.name, m.topology.name, m.topology.params) == ("FedAvg", "RotationTopology", {})


def test_an_empty_training_loader_is_refused_and_one_without_a_length_is_not(tmp_path: Path) -> None:
    empty = load_script(write(tmp_path, GOOD.replace("return [(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))], []",
                                                     "return [], None"), "empty.py"))
    with pytest.raises(NodeConfigError, match=r"empty.py returned an empty train_loader \(0 batches\)") as err:
        empty.build_loaders(None)
    assert err.value.code == ExitCode.NODE
    streamed = load_script(write(tmp_path, GOOD.replace("return [(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))], []",
                                                        "return iter([]), None"), "streamed.py"))
    assert streamed.build_loaders(None).val is None  # an iterator cannot tell its length: not refused


LOSS_SCRIPT = """
import torch
from torch.utils.data import DataLoader, TensorDataset
def build_model(manifest, **kw):
    return torch.nn.Linear(3, 2)
def build_loaders(manifest, **kw):
    x = torch.randn(40, 3)
    y = x[:, :2].clone()
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=20)
def loss_fn(outputs, targets):
    return {body}
"""
BAD_LOSSES = {
    "per-sample": "torch.nn.functional.mse_loss(outputs, targets, reduction='none')",
    "float": "torch.nn.functional.mse_loss(outputs, targets).item()",
    "detached": "torch.tensor(torch.nn.functional.mse_loss(outputs, targets).item())",
}


@pytest.mark.parametrize("kind", sorted(BAD_LOSSES))
def test_a_loss_fn_that_gives_no_trainable_scalar_is_one_line_at_the_dry_run(tmp_path: Path, kind: str) -> None:
    """Per-sample losses, a float or a loss cut off from the outputs passed the dry run; training then died on
    ``loss.item()`` or ``backward()`` with a traceback (simulate exit 1)."""
    from quinkgl_cli.node.probe import probe_batches

    script = load_script(write(tmp_path, LOSS_SCRIPT.format(body=BAD_LOSSES[kind])))
    model = script.build_model(None)
    train, val, _ = script.build_loaders(None)
    assert script.loss_fn is not None
    with pytest.raises(NodeConfigError, match="loss_fn in peer_script.py returned") as err:
        probe_batches(model, script.loss_fn, (3,), {"train": train, "val": val})
    assert err.value.code == ExitCode.NODE and "\n" not in err.value.message


def test_a_loss_fn_giving_per_sample_losses_stops_simulate_with_exit_7(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quinkgl_cli.cli.app import main
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import write_manifest

    path = write(tmp_path, LOSS_SCRIPT.format(body=BAD_LOSSES["per-sample"]))
    manifest = tmp_path / "m.qgl"
    write_manifest(manifest, build_manifest(
        name="loss-sim", task_type="regression", input_shape="3", output_shape="2", label_type="float",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(path).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    ))  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(path), "--peers", "2", "--rounds", "1"])
    assert done.value.code == ExitCode.NODE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "loss_fn" in err
