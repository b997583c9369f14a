"""Per-peer data for the simulator: a peer's slice of the shared training set, and the shared validation batches.

A swarm of hundreds of peers in one process spends most of its time in data loading when each peer goes through
a `DataLoader` (one `__getitem__` and one collate per sample). When the dataset is a `TensorDataset` (or a
`Subset` of one), `TensorSliceLoader` gathers a whole batch with one index operation instead; like
``DataLoader(Subset(dataset, indices), batch_size, shuffle=True)`` it reshuffles on every pass (from its own seeded
generator) and yields the last, smaller batch too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset


class TensorSliceLoader:
    """Shuffled mini-batches of the rows ``rows`` of ``tensors``; ``dataset`` is the peer's `Subset` (its size)."""

    def __init__(self, tensors: Sequence[torch.Tensor], rows: np.ndarray, subset: Subset, batch_size: int,
                 generator: torch.Generator) -> None:
        self.dataset = subset
        self.batch_size = batch_size
        self._rows = torch.as_tensor(rows, dtype=torch.int64)
        self._tensors = tuple(tensors)
        self._generator = generator

    def __len__(self) -> int:
        return (len(self._rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        order = self._rows[torch.randperm(len(self._rows), generator=self._generator)]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield [t[batch] for t in self._tensors]


def _base_tensors(dataset: Any) -> tuple[tuple[torch.Tensor, ...], np.ndarray] | None:
    """(tensors, row of each dataset index) when ``dataset`` is a TensorDataset or Subsets over one."""
    mapping: np.ndarray | None = None
    while isinstance(dataset, Subset):
        idx = np.asarray(dataset.indices, dtype=np.int64)
        mapping = idx if mapping is None else idx[mapping]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset):
        return None
    if mapping is None:
        mapping = np.arange(len(dataset), dtype=np.int64)
    return dataset.tensors, mapping


def peer_loader(dataset: Any, indices: np.ndarray, batch_size: int, generator: torch.Generator) -> Any:
    """The training loader of one peer holding ``dataset[indices]``."""
    subset = Subset(dataset, indices.tolist())
    base = _base_tensors(dataset)
    if base is None:
        return DataLoader(subset, batch_size=batch_size, shuffle=True, generator=generator)
    tensors, mapping = base
    return TensorSliceLoader(tensors, mapping[indices], subset, batch_size, generator)


def materialize(loader: Any) -> list[Any]:
    """The validation batches, read once and shared by every peer (validation data does not change)."""
    return list(loader)
