"""Peer script: handwritten digits (scikit-learn's load_digits, offline), MLP 64-32-10.

Every peer loads the same 1,797 images, keeps a fixed stratified validation set (20%, identical on every peer so
accuracies compare) and trains on its own part of the rest. Script arguments (all strings, `--script-arg k=v`):

    shard=I            which part this peer trains on (0-based, default 0)
    num_shards=N       how many parts the training set is cut into (default 1: the whole training set)
    partition=SCHEME   iid | shards:K | dirichlet:ALPHA (label-skewed non-IID), default iid
    seed=S             seed of the split (must be the same on every peer) and of the shuffling, default 0
    batch_size=B       default 32
    lr=LR              SGD learning rate, default 0.05 (momentum 0.9)

Example: five peers, each with two digit classes:
    quinkgl run ... --script peer_scripts/digits_peer_script.py \
        --script-arg shard=3 --script-arg num_shards=5 --script-arg partition=shards:2
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.sim.partition import partition_indices

VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 0  # fixed, not the `seed` argument: every peer must hold the very same validation set
_settings = {"lr": 0.05}


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _split():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=VALIDATION_FRACTION, stratify=y, random_state=VALIDATION_SEED)


def build_loaders(manifest, **kwargs):
    shard = int(kwargs.get("shard", 0))
    num_shards = int(kwargs.get("num_shards", 1))
    partition = kwargs.get("partition", "iid")
    seed = int(kwargs.get("seed", 0))
    batch_size = int(kwargs.get("batch_size", 32))
    _settings["lr"] = float(kwargs.get("lr", 0.05))
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is outside 0..{num_shards - 1}")
    x_train, x_val, y_train, y_val = _split()
    if num_shards > 1:
        idx = partition_indices(y_train, num_shards, partition, seed)[shard]
        x_train, y_train = x_train[idx], y_train[idx]
    train_ds = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    val_ds = TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val))
    shuffle = torch.Generator().manual_seed(seed * 100_003 + shard)
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=shuffle)
    val_loader = DataLoader(val_ds, batch_size=512, shuffle=False)
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
