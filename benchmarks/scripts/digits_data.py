"""The data half of the benchmark peer scripts: scikit-learn's digits, a stratified validation fifth, and this peer's
part of the rest (quinkgl's label partitions, so a daemon and `quinkgl simulate --partition script` agree); with
``own_holdout=F``, a seeded share F of each of this peer's classes as its own test data (the third loader), split as
the bundled digits script splits it."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.peer_scripts.digits_peer_script import validation_split
from quinkgl_cli.sim.partition import partition_indices


def digits_loaders(kwargs, images=False):
    """(train_loader, val_loader[, own_loader]) for script arguments shard, num_shards, partition, seed, batch_size,
    own_holdout."""
    shard = int(kwargs.get("shard", 0))
    num_shards = int(kwargs.get("num_shards", 1))
    partition = kwargs.get("partition", "iid")
    seed = int(kwargs.get("seed", 0))
    batch_size = int(kwargs.get("batch_size", 32))
    own_holdout = float(kwargs.get("own_holdout", 0))
    if not 0 <= own_holdout < 1:
        raise ValueError(f"own_holdout={own_holdout} is outside [0, 1)")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if num_shards > 1:
        idx = partition_indices(y_train, num_shards, partition, seed)[shard]
        x_train, y_train = x_train[idx], y_train[idx]
    own = None
    if own_holdout > 0:
        keep, held = validation_split(y_train, own_holdout, seed * 100_003 + shard)
        own = DataLoader(TensorDataset(torch.from_numpy(x_train[held]), torch.from_numpy(y_train[held])),
                         batch_size=512)
        x_train, y_train = x_train[keep], y_train[keep]
    order = torch.Generator().manual_seed(seed * 1000 + shard)
    train = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)), batch_size=batch_size,
                       shuffle=True, generator=order)
    val = DataLoader(TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val)), batch_size=512)
    return (train, val) if own is None else (train, val, own)
