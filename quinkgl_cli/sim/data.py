"""Per-peer data for the simulator: a peer's slice of the shared training set, and the shared validation batches.

A swarm of hundreds of peers in one process spends most of its time in data loading when each peer goes through
a `DataLoader` (one `__getitem__` and one collate per sample). When the dataset is a `TensorDataset` (or a
`Subset` of one), `TensorSliceLoader` gathers a whole batch with one index operation instead; like
``DataLoader(Subset(dataset, indices), batch_size, shuffle=True)`` it reshuffles on every pass (from its own seeded
generator) and yields the last, smaller batch too, unless the script's loader drops it (``drop_last``).

A peer's loader batches as the script's training loader does: a ``collate_fn`` of the script's (padding sequences of
varying length, converting types) is kept, on a `DataLoader` of the peer's `Subset`; the default collation
gathers slices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate


class TensorSliceLoader:
    """Shuffled mini-batches of the rows ``rows`` of ``tensors``; ``dataset`` is the peer's `Subset` (its size)."""

    def __init__(self, tensors: Sequence[torch.Tensor], rows: np.ndarray, subset: Subset, batch_size: int,
                 generator: torch.Generator, drop_last: bool = False) -> None:
        self.dataset = subset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._rows = torch.as_tensor(rows, dtype=torch.int64)
        self._tensors = tuple(tensors)
        self._generator = generator

    def __len__(self) -> int:
        if self.drop_last:
            return len(self._rows) // self.batch_size
        return (len(self._rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        order = self._rows[torch.randperm(len(self._rows), generator=self._generator)]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
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


def peer_loader(dataset: Any, indices: np.ndarray, batch_size: int, generator: torch.Generator,
                like: Any = None) -> Any:
    """The training loader of one peer holding ``dataset[indices]``, batched as the script's loader ``like``."""
    subset = Subset(dataset, indices.tolist())
    collate = getattr(like, "collate_fn", None)
    drop_last = bool(getattr(like, "drop_last", False))
    base = _base_tensors(dataset)
    if base is None or (collate is not None and collate is not default_collate):
        return DataLoader(subset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate,
                          drop_last=drop_last)
    tensors, mapping = base
    return TensorSliceLoader(tensors, mapping[indices], subset, batch_size, generator, drop_last)


def materialize(loader: Any) -> list[Any]:
    """The validation batches, read once and shared by every peer (validation data does not change)."""
    return list(loader)
