"""Peer script: MNIST digits with torchvision (the guide's example), MLP 784-128-64-10.

Needs `torchvision` and the MNIST files under ``data_root`` (torchvision's layout: <data_root>/MNIST/raw/...).
Nothing is downloaded unless you ask: pass ``--script-arg download=true`` once on a machine with internet access.
Without torchvision or the files, the daemon stops at start-up with a one-line message saying what to do.

Script arguments (all strings, ``--script-arg k=v``):

    data_root=DIR      where the MNIST folder lives (default ./data)
    download=BOOL      let torchvision fetch the files if they are missing (default false)
    batch_size=B       default 32
    shard=I            which part of the training set this peer keeps (0-based, default 0)
    num_shards=N       into how many parts the training set is cut (default 1: all of it)
    partition=SCHEME   iid | shards:K | classes:K | dirichlet:ALPHA (label-skewed), default iid
    seed=S             seed of the split; the same on every peer (default 0)
    lr=LR              SGD learning rate, default 0.05 (momentum 0.9)
"""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

_settings = {"lr": 0.05}


class MNISTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


def build_model(manifest, **kwargs):
    return MNISTNet()


def _flag(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _datasets():
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise RuntimeError(
            "torchvision is not installed: run `pip install torchvision` (or use peer_scripts/digits_peer_script.py, "
            "which needs no download)"
        ) from None
    return datasets, transforms


def _load(cls, name, root, download, **kwargs):
    try:
        return cls(root=root, download=download, **kwargs)
    except RuntimeError as exc:
        if download:
            raise
        raise RuntimeError(
            f"{name} not found under {root} ({exc}); pass --script-arg download=true once with internet access, "
            f"or --script-arg data_root=DIR where the {name} folder is"
        ) from None


def _shard(dataset, labels, kwargs):
    shard = int(kwargs.get("shard", 0))
    num_shards = int(kwargs.get("num_shards", 1))
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is outside 0..{num_shards - 1}")
    if num_shards == 1:
        return dataset
    from quinkgl_cli.sim.partition import partition_indices

    parts = partition_indices(labels, num_shards, kwargs.get("partition", "iid"), int(kwargs.get("seed", 0)))
    return Subset(dataset, parts[shard].tolist())


def build_loaders(manifest, **kwargs):
    datasets, transforms = _datasets()
    batch_size = int(kwargs.get("batch_size", 32))
    data_root = kwargs.get("data_root", "./data")
    download = _flag(kwargs.get("download", "false"))
    _settings["lr"] = float(kwargs.get("lr", 0.05))
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
    train_ds = _load(datasets.MNIST, "MNIST", data_root, download, train=True, transform=transform)
    val_ds = _load(datasets.MNIST, "MNIST", data_root, download, train=False, transform=transform)
    train_ds = _shard(train_ds, [int(t) for t in train_ds.targets], kwargs)
    generator = torch.Generator().manual_seed(int(kwargs.get("seed", 0)) * 100_003 + int(kwargs.get("shard", 0)))
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
    return train_loader, val_loader


def build_optimizer(manifest, model):
    return torch.optim.SGD(model.parameters(), lr=_settings["lr"], momentum=0.9)


def on_round_end(round_idx, metrics):
    loss = metrics.get("loss")
    acc = metrics.get("val_accuracy")
    if acc is None:
        acc = metrics.get("accuracy")
    tag = f"round={round_idx:03d}"
    if loss is not None:
        tag += f" loss={loss:.4f}"
    if acc is not None:
        tag += f" acc={acc:.3f}"
    print(tag, flush=True)


def on_peer_discovered(peer_id):
    print(f"[peer-discovered] {peer_id}", flush=True)


def on_aggregation_done(peer_ids, sample_count):
    print(f"[aggregated] peers={list(peer_ids)} samples={sample_count}", flush=True)
