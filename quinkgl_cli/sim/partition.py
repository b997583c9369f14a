"""Splitting one labelled dataset among peers: IID, label shards, or Dirichlet label skew.

Pure numpy (no torch import) so a peer script can use it cheaply. Every scheme is deterministic for a seed and
returns disjoint index arrays that together cover the dataset (a scheme never drops samples):

- ``iid``: each class dealt round-robin over the peers, so every peer holds an (almost) equal, stratified share.
- ``shards:K``: every class cut into label-pure shards, ``K`` shards per peer with ``K`` distinct labels when the
  data allows it (McMahan et al.'s pathological non-IID split, without the shards that straddle two labels).
- ``classes:K``: peer ``p`` holds the ``K`` consecutive classes starting at class ``p * K`` (wrapping around), and a
  class held by several peers is dealt evenly among them: 4 peers with ``classes:3`` on 10 classes hold 0-2, 3-5,
  6-8 and 9-0-1. The peers' label sets overlap only where ``N * K`` exceeds the number of classes; fewer slots than
  classes would drop data and is refused.
- ``dirichlet:ALPHA``: per class, the share of each peer is drawn from Dirichlet(ALPHA); small ALPHA means strong skew.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quinkgl_cli.batches import batch_parts
from quinkgl_cli.errors import UsageError

SCHEMES = ("iid", "shards:K", "classes:K", "dirichlet:ALPHA")
# Dirichlet draws leave some peers (almost) empty; redraw until each peer holds this many samples (bounded retries).
_DIRICHLET_MIN_SAMPLES = 2
_DIRICHLET_RETRIES = 100
_SWAP_PASSES = 20


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # "iid" | "shards" | "classes" | "dirichlet"
    shards: int = 0  # shards:K and classes:K
    alpha: float = 0.0

    def __str__(self) -> str:
        if self.kind in ("shards", "classes"):
            return f"{self.kind}:{self.shards}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return "iid"


def parse_scheme(text: str) -> PartitionScheme:
    """``iid``, ``shards:K`` / ``classes:K`` (K >= 1) or ``dirichlet:ALPHA`` (ALPHA > 0); anything else is a usage
    error."""
    raw = text.strip().lower()
    kind, _, arg = raw.partition(":")
    hint = f"use one of {', '.join(SCHEMES)} (e.g. shards:2, classes:3, dirichlet:0.3)"
    if kind == "iid" and not arg:
        return PartitionScheme("iid")
    if kind in ("shards", "classes"):
        what = "shard" if kind == "shards" else "class"
        try:
            k = int(arg)
        except ValueError:
            raise UsageError(f"partition {text!r}: {what} count {arg!r} is not an integer", hint) from None
        if k < 1:
            raise UsageError(f"partition {text!r}: {what} count must be at least 1", hint)
        return PartitionScheme(kind, shards=k)
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise UsageError(f"partition {text!r}: alpha {arg!r} is not a number", hint) from None
        if not np.isfinite(alpha) or alpha <= 0:
            raise UsageError(f"partition {text!r}: alpha must be a positive number", hint)
        return PartitionScheme("dirichlet", alpha=alpha)
    raise UsageError(f"unknown partition {text!r}", hint)


def partition_indices(labels: Sequence[int] | np.ndarray, num_parts: int, scheme: str | PartitionScheme, seed: int) -> list[np.ndarray]:
    """Indices of ``labels`` for each of ``num_parts`` peers (sorted int64 arrays, disjoint, covering all)."""
    if isinstance(scheme, str):
        scheme = parse_scheme(scheme)
    y = np.asarray(labels).reshape(-1)
    if num_parts < 1:
        raise UsageError(f"cannot split data among {num_parts} peers", "use at least 1 peer")
    if len(y) < num_parts:
        raise UsageError(
            f"{len(y)} samples cannot give each of {num_parts} peers at least one", "use fewer peers or more data"
        )
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid":
        parts = _iid(y, num_parts, rng)
    elif scheme.kind == "shards":
        parts = _shards(y, num_parts, scheme.shards, rng)
    elif scheme.kind == "classes":
        parts = _consecutive_classes(y, num_parts, scheme.shards, rng)
    else:
        parts = _dirichlet(y, num_parts, scheme.alpha, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _classes(y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index array of every class, classes in sorted order."""
    out = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        out.append(idx)
    return out


def _iid(y: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[int]] = [[] for _ in range(n)]
    start = 0
    for idx in _classes(y, rng):
        # Rotating the first receiver keeps peer sizes within one sample of each other across classes.
        for j, i in enumerate(idx):
            buckets[(start + j) % n].append(int(i))
        start = (start + len(idx)) % n
    order = rng.permutation(n)
    return [np.array(buckets[k], dtype=np.int64) for k in order]


def _shard_counts(sizes: np.ndarray, total: int) -> np.ndarray:
    """Shards per class, proportional to class size (largest remainder), each class >= 1 and <= its size."""
    counts = np.ones(len(sizes), dtype=np.int64)
    spare = total - len(sizes)
    if spare > 0:
        share = sizes / sizes.sum() * total - 1.0
        extra = np.floor(np.clip(share, 0, None)).astype(np.int64)
        extra = np.minimum(extra, sizes - 1)
        while extra.sum() > spare:
            extra[int(np.argmax(extra))] -= 1
        counts += extra
        left = total - int(counts.sum())
        remainder = share - np.floor(np.clip(share, 0, None))
        for c in np.argsort(-remainder, kind="stable"):
            if left <= 0:
                break
            if counts[c] < sizes[c]:
                counts[c] += 1
                left -= 1
        while left > 0:  # tiny classes full: give shards to the largest classes that still have samples
            c = int(np.argmax(sizes - counts))
            counts[c] += 1
            left -= 1
    return counts


def _shards(y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = _classes(y, rng)
    total = n * k
    if total < len(classes) or total > len(y):
        # Too few shards for label-pure ones (or too many for the data): contiguous cuts of the label-sorted data,
        # the tutorial's construction; each peer still sees only neighbouring labels.
        order = np.concatenate(classes)
        pieces = np.array_split(order, total)
        perm = rng.permutation(total)
        return [np.concatenate([pieces[perm[p * k + j]] for j in range(k)]) for p in range(n)]
    counts = _shard_counts(np.array([len(c) for c in classes]), total)
    shards: list[np.ndarray] = []
    shard_label: list[int] = []
    for label, (idx, c) in enumerate(zip(classes, counts, strict=True)):
        for piece in np.array_split(idx, int(c)):
            shards.append(piece)
            shard_label.append(label)
    perm = rng.permutation(total)
    assign = perm.reshape(n, k)  # assign[p] = shard ids of peer p
    labels = np.array(shard_label)
    _make_labels_distinct(assign, labels, rng)
    return [np.concatenate([shards[s] for s in assign[p]]) for p in range(n)]


def _make_labels_distinct(assign: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
    """Swap shards between peers until no peer holds two shards of one label (when a random swap can fix it)."""
    n, k = assign.shape
    if k == 1:
        return
    for _ in range(_SWAP_PASSES):
        bad = [p for p in range(n) if len(set(labels[assign[p]])) < k]
        if not bad:
            return
        for p in bad:
            row = labels[assign[p]]
            _, first = np.unique(row, return_index=True)
            dup_slots = [j for j in range(k) if j not in set(first)]
            for j in dup_slots:
                mine = set(labels[assign[p]])
                for q in rng.permutation(n):
                    if q == p:
                        continue
                    theirs = labels[assign[q]]
                    for t in rng.permutation(k):
                        give, take = labels[assign[p, j]], theirs[t]
                        if take in mine:
                            continue
                        rest_q = set(np.delete(theirs, t))
                        if give in rest_q:
                            continue
                        assign[p, j], assign[q, t] = assign[q, t], assign[p, j]
                        break
                    else:
                        continue
                    break


def _consecutive_classes(y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = _classes(y, rng)
    if n * k < len(classes):
        raise UsageError(f"classes:{k} gives {n} peers {n * k} class slots for {len(classes)} classes: "
                         f"{len(classes) - n * k} classes would hold no peer",
                         f"use classes:{-(-len(classes) // n)} or more, or more peers")
    if k > len(classes):
        raise UsageError(f"classes:{k} asks for more classes per peer than the data has ({len(classes)})",
                         f"use classes:{len(classes)} at most")
    holders: list[list[int]] = [[] for _ in classes]
    for p in range(n):
        for j in range(k):
            holders[(p * k + j) % len(classes)].append(p)
    buckets: list[list[int]] = [[] for _ in range(n)]
    for idx, peers in zip(classes, holders, strict=True):
        for peer, piece in zip(peers, np.array_split(idx, len(peers)), strict=True):
            buckets[peer].extend(int(i) for i in piece)
    return [np.array(b, dtype=np.int64) for b in buckets]


def _dirichlet(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = _classes(y, rng)
    min_size = min(_DIRICHLET_MIN_SAMPLES, len(y) // n)
    buckets: list[list[int]] = [[] for _ in range(n)]
    for _ in range(_DIRICHLET_RETRIES):
        buckets = [[] for _ in range(n)]
        for idx in classes:
            props = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
            for p, piece in enumerate(np.split(idx, cuts)):
                buckets[p].extend(int(i) for i in piece)
        if min(len(b) for b in buckets) >= min_size:
            break
    else:
        # Still some starved peers after the retries: move samples from the largest peers, keeping all data.
        for p in range(n):
            while len(buckets[p]) < min_size:
                donor = max(range(n), key=lambda q: len(buckets[q]))
                buckets[p].append(buckets[donor].pop())
    return [np.array(b, dtype=np.int64) for b in buckets]


def dataset_labels(dataset: Any) -> np.ndarray:
    """Integer labels of a map-style dataset: ``.tensors[1]`` (TensorDataset), ``.targets`` / ``.labels``, a Subset's
    parent, or finally the targets of each item ``dataset[i]``, read as the trainer reads a batch (`batch_parts`:
    the second of a tuple, a dict's ``y`` / ``target``)."""
    from_subset = getattr(dataset, "indices", None)
    parent = getattr(dataset, "dataset", None)
    if from_subset is not None and parent is not None:
        return dataset_labels(parent)[np.asarray(from_subset, dtype=np.int64)]
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return _as_int_labels(tensors[1])
    for attr in ("targets", "labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            try:
                arr = _as_int_labels(value)
            except (TypeError, ValueError):
                continue
            if len(arr) == len(dataset):
                return arr
    return _as_int_labels(batch_parts(dataset[i])[1] for i in range(len(dataset)))


def _as_int_labels(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    elif not isinstance(values, np.ndarray):
        values = np.array([_scalar(v) for v in (values if not isinstance(values, Iterable) else list(values))])
    arr = np.asarray(values)
    if arr.ndim == 2:  # a binary classifier's one column (`node.classes`), or one-hot labels
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.argmax(axis=1)
    if arr.ndim != 1:
        raise ValueError(f"labels of shape {arr.shape} are not per-sample class ids")
    if arr.dtype.kind == "f" and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError("labels are not integers; label-based partitioning needs class labels")
    return arr.astype(np.int64)


def _scalar(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    return arr.argmax() if arr.ndim == 1 and arr.size > 1 else arr.reshape(-1)[0] if arr.size else value
