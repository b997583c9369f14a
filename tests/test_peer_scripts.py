"""The torchvision peer scripts' loaders offline, against a fake torchvision (MNIST's are also in test_script_loader)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.node.script import load_script

SCRIPTS = Path(__file__).resolve().parents[1] / "peer_scripts"


def fake_torchvision(monkeypatch: pytest.MonkeyPatch, present: bool, shape: tuple[int, ...]) -> list[dict]:
    """A torchvision whose datasets raise torchvision's own 'not found' RuntimeError unless ``present``."""
    calls: list[dict] = []

    class Dataset(torch.utils.data.Dataset):
        def __init__(self, root: str, download: bool = False, train: bool = True, transform: object = None) -> None:
            calls.append({"root": root, "download": download, "train": train})
            if not present:
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
            self.targets = list(range(10)) * (6 if train else 2)

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(shape), self.targets[i]

    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")
    datasets.MNIST = datasets.CIFAR10 = Dataset  # type: ignore[attr-defined]
    transforms.Compose = lambda steps: steps  # type: ignore[attr-defined]
    transforms.ToTensor = lambda: None  # type: ignore[attr-defined]
    transforms.Normalize = lambda *a: None  # type: ignore[attr-defined]
    tv.datasets, tv.transforms = datasets, transforms  # type: ignore[attr-defined]
    for name, module in (("torchvision", tv), ("torchvision.datasets", datasets), ("torchvision.transforms", transforms)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_cifar10_missing_data_says_what_to_do_and_downloads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch, present=False, shape=(3, 32, 32))
    script = load_script(SCRIPTS / "cifar10_peer_script.py")
    with pytest.raises(NodeConfigError, match=r"CIFAR-10 not found under /nowhere .*download=true.*data_root=DIR"):
        script.build_loaders(None, data_root="/nowhere")
    assert calls == [{"root": "/nowhere", "download": False, "train": True}]


def test_cifar10_shards_the_training_set_and_keeps_the_whole_test_set(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch, present=True, shape=(3, 32, 32))
    script = load_script(SCRIPTS / "cifar10_peer_script.py")
    model = script.build_model(None)
    shards = []
    for shard in range(3):
        train, val, _ = script.build_loaders(None, shard=str(shard), num_shards="3", partition="iid", download="yes")
        labels = [int(y) for _, ys in train for y in ys]
        shards.append(set(train.dataset.indices))
        assert len(labels) == 20 and sorted(set(labels)) == list(range(10)) and len(val.dataset) == 20
        x, _ = next(iter(val))
        assert model(x).shape == (x.shape[0], 10)
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and len(set().union(*shards)) == 60
    assert all(c["download"] is True for c in calls)
    with pytest.raises(NodeConfigError, match="shard=3 is outside 0..2"):
        script.build_loaders(None, shard="3", num_shards="3")
