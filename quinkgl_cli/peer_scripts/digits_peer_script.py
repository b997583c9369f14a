"""Peer script: handwritten digits (scikit-learn's bundled 8x8 digits, offline), MLP 64-32-10.

Every peer loads the same 1,797 images, keeps a fixed validation set (20% of each digit, identical on
every peer so accuracies compare) and trains on its own part of the rest. Script arguments (all strings,
`--script-arg k=v`):

    shard=I            which part this peer trains on (0-based, default 0)
    num_shards=N       how many parts the training set is cut into (default 1: the whole training set)
    partition=SCHEME   iid | shards:K | classes:K | dirichlet:ALPHA (label-skewed non-IID), default iid
    seed=S             seed of the split (must be the same on every peer) and of the shuffling, default 0
    batch_size=B       default 32
    lr=LR              SGD learning rate, default 0.05 (momentum 0.9)
    own_holdout=F      hold out this fraction of each of this peer's classes (0 <= F < 1, default 0) as its own
                       test data: the third loader, on which a personal model's own_accuracy is measured
                       (without it, own_accuracy is estimated on the validation set)

Example: five peers, each with two digit classes:
    quinkgl run ... --script peer_scripts/digits_peer_script.py \
        --script-arg shard=3 --script-arg num_shards=5 --script-arg partition=shards:2

The images are read from the CSV scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) without importing
scikit-learn: its import (scipy) costs about a second and 75 MB of every peer's start-up.
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.sim.partition import partition_indices

__all__ = [
    "build_model", "build_loaders", "build_optimizer", "on_round_end", "on_peer_discovered", "on_aggregation_done",
    "load_digits_arrays", "validation_split",
]

VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 0  # fixed, not the `seed` argument: every peer must hold the very same validation set
_settings = {"lr": 0.05}


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _digits_csv():
    """scikit-learn's digits CSV, located without importing scikit-learn; None when it is not there."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays():
    """(data, target) exactly as ``sklearn.datasets.load_digits()`` returns them: float64 pixels 0..16, int labels."""
    path = _digits_csv()
    if path is None:  # an unusual install (zipped, vendored): let scikit-learn find its own data
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def validation_split(labels, fraction=VALIDATION_FRACTION, seed=VALIDATION_SEED):
    """(train, val) index arrays, both sorted: each class sends ``fraction`` of its samples (rounded to the nearest
    count) to validation, the ones with the smallest seeded random keys.

    The keys are raw 64-bit draws of NumPy's PCG64 bit generator, whose stream NumPy keeps fixed across versions
    (unlike ``Generator`` methods such as ``permutation``), so every peer, whatever its NumPy, holds the very same
    validation set."""
    labels = np.asarray(labels)
    keys = np.random.PCG64(seed).random_raw(len(labels))
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(keys[members], kind="stable")]
        n_val = int(fraction * len(members) + 0.5)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _split():
    data, target = load_digits_arrays()
    x = (data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    y = target.astype(np.int64)
    train, val = validation_split(y)
    return x[train], x[val], y[train], y[val]


def build_loaders(manifest, **kwargs):
    shard = int(kwargs.get("shard", 0))
    num_shards = int(kwargs.get("num_shards", 1))
    partition = kwargs.get("partition", "iid")
    seed = int(kwargs.get("seed", 0))
    batch_size = int(kwargs.get("batch_size", 32))
    _settings["lr"] = float(kwargs.get("lr", 0.05))
    own_holdout = float(kwargs.get("own_holdout", 0))
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is outside 0..{num_shards - 1}")
    if not 0 <= own_holdout < 1:
        raise ValueError(f"own_holdout={own_holdout} is outside [0, 1)")
    x_train, x_val, y_train, y_val = _split()
    if num_shards > 1:
        idx = partition_indices(y_train, num_shards, partition, seed)[shard]
        x_train, y_train = x_train[idx], y_train[idx]
    own_loader = None
    if own_holdout > 0:
        keep, held = validation_split(y_train, own_holdout, seed * 100_003 + shard)
        own_ds = TensorDataset(torch.from_numpy(x_train[held]), torch.from_numpy(y_train[held]))
        own_loader = DataLoader(own_ds, batch_size=512, shuffle=False)
        x_train, y_train = x_train[keep], y_train[keep]
    train_ds = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    val_ds = TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val))
    shuffle = torch.Generator().manual_seed(seed * 100_003 + shard)
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=shuffle)
    val_loader = DataLoader(val_ds, batch_size=512, shuffle=False)
    return (train_loader, val_loader) if own_loader is None else (train_loader, val_loader, own_loader)


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
