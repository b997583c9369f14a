"""Accuracy on a peer's own data distribution, estimated on the shared validation set.

A peer's users care first about the classes its own data holds. A script may give the peer its own test data (the
third loader of ``build_loaders``, `node.script.Loaders`); without it, this estimate stands in: the accuracy of
each class on the validation set, weighted by that class's share of the peer's training labels
(``own_accuracy``). That is the expected accuracy on test data drawn from the peer's label distribution, at no cost
in training data (on 20-peer digits a peer holds about 70 images); it sees label skew, not a shift of the inputs
themselves.

Owns no state: `label_shares` reads the labels once at start, `class_hits` counts one batch's hits per class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset

from quinkgl_cli.batches import batch_parts
from quinkgl_cli.node.classes import ClassReading


def _dataset_labels(dataset: Any) -> torch.Tensor | None:
    """The labels of a TensorDataset, a dataset with ``targets``, or Subsets of either, without loading inputs."""
    rows: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        rows = idx if rows is None else idx[rows]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    elif hasattr(dataset, "targets"):
        labels = torch.as_tensor(dataset.targets)
    else:
        return None
    return labels if rows is None else labels[rows]


def _class_ids(y: torch.Tensor) -> torch.Tensor | None:
    """Integer class ids of a target batch (one-hot targets by their argmax, one float column above 0.5 as
    `node.classes` reads it); None for other targets."""
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
        return (y > 0.5).to(torch.int64) if y.is_floating_point() else y.to(torch.int64)
    if y.is_floating_point():
        return y.argmax(dim=1) if y.dim() == 2 else None
    return y.reshape(-1).to(torch.int64) if y.dim() <= 1 else None


def label_shares(loader: Iterable[Any]) -> dict[int, float] | None:
    """Each class's share of the training labels behind ``loader``; None when the labels are not class ids.

    Read from the dataset when it exposes its labels (no input is loaded, no shuffling generator is advanced),
    else from one pass over the loader."""
    labels = _dataset_labels(getattr(loader, "dataset", None))
    if labels is None:
        parts = []
        for batch in loader:
            y = batch_parts(batch)[1] if isinstance(batch, (Mapping, list, tuple)) else None
            ids = _class_ids(y) if isinstance(y, torch.Tensor) else None
            if ids is None:
                return None
            parts.append(ids)
        labels = torch.cat(parts) if parts else None
    else:
        labels = _class_ids(torch.as_tensor(labels))
    if labels is None or labels.numel() == 0 or bool((labels < 0).any()):
        return None
    counts = torch.bincount(labels)
    total = float(counts.sum())
    return {c: float(n) / total for c, n in enumerate(counts.tolist()) if n > 0}


def class_hits(outputs: Any, y: torch.Tensor, classes: ClassReading) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(correct, seen) per class id for one batch, read by ``classes``; None when the outputs or targets are not
    class scores / ids."""
    out = classes.scores(outputs)
    if out is None or classes.multilabel or not isinstance(y, torch.Tensor) or out.dim() != 2:
        return None
    pairs = classes.pairs(out, y)
    if pairs is None or pairs[1].dim() != 1 or bool((pairs[1] < 0).any()):
        return None
    target = pairs[1].to(torch.int64)
    n = max(out.shape[1], int(target.max()) + 1 if target.numel() else 0)
    pred = pairs[0].to(target.device)
    seen = torch.bincount(target, minlength=n)
    correct = torch.bincount(target[pred == target], minlength=n)
    return correct.cpu(), seen.cpu()


def weighted_accuracy(correct: torch.Tensor, seen: torch.Tensor, shares: dict[int, float]) -> float | None:
    """Per-class accuracy weighted by ``shares``, renormalised over the peer's classes the validation set holds."""
    total = 0.0
    weight = 0.0
    hit, count = correct.tolist(), seen.tolist()  # as numbers once, not a tensor index per class
    for c, share in shares.items():
        if c < len(count) and count[c] > 0:
            total += share * float(hit[c]) / float(count[c])
            weight += share
    return total / weight if weight > 0 else None
