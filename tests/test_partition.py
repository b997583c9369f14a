"""Label partitions: disjoint, complete, deterministic, and with the label structure each scheme promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from quinkgl_cli.errors import UsageError
from quinkgl_cli.sim.partition import dataset_labels, parse_scheme, partition_indices


def digits_like(n: int = 1437, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def check_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n, "parts must be disjoint and cover every sample"
    assert all(len(p) > 0 for p in parts)


def test_iid_is_stratified_and_balanced() -> None:
    y = digits_like()
    parts = partition_indices(y, 20, "iid", seed=3)
    check_cover(parts, len(y))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    overall = np.bincount(y, minlength=10) / len(y)
    for p in parts:
        assert len(set(y[p].tolist())) == 10
        share = np.bincount(y[p], minlength=10) / len(p)
        assert np.abs(share - overall).max() < 0.06


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_each_peer_exactly_k_labels(k: int) -> None:
    y = digits_like()
    parts = partition_indices(y, 20, f"shards:{k}", seed=7)
    check_cover(parts, len(y))
    assert [len(set(y[p].tolist())) for p in parts] == [k] * 20
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 2 * min(sizes)


def test_shards_with_fewer_shards_than_classes_still_cover_everything() -> None:
    y = digits_like()
    parts = partition_indices(y, 3, "shards:2", seed=1)  # 6 shards < 10 classes: contiguous label-sorted cuts
    check_cover(parts, len(y))
    assert all(len(set(y[p].tolist())) <= 6 for p in parts)


def test_classes_give_peers_consecutive_label_blocks() -> None:
    y = digits_like()
    parts = partition_indices(y, 4, "classes:3", seed=2)
    check_cover(parts, len(y))
    assert [sorted(set(y[p].tolist())) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 9]]
    for label in (0, 1):  # a class with two holders is dealt evenly between them
        counts = [int(np.sum(y[p] == label)) for p in (parts[0], parts[3])]
        assert abs(counts[0] - counts[1]) <= 1
    disjoint = partition_indices(y, 5, "classes:2", seed=2)
    assert [sorted(set(y[p].tolist())) for p in disjoint] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@pytest.mark.parametrize(("peers", "scheme"), [(3, "classes:3"), (2, "classes:11")])
def test_classes_that_would_drop_data_are_refused(peers: int, scheme: str) -> None:
    with pytest.raises(UsageError):
        partition_indices(digits_like(), peers, scheme, seed=0)


def test_dirichlet_small_alpha_skews_labels() -> None:
    y = digits_like()
    skewed = partition_indices(y, 20, "dirichlet:0.1", seed=5)
    mild = partition_indices(y, 20, "dirichlet:100", seed=5)
    check_cover(skewed, len(y))
    check_cover(mild, len(y))

    def top_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    assert top_share(skewed) > 0.5 > 0.2 > top_share(mild)
    assert min(len(p) for p in skewed) >= 2


@pytest.mark.parametrize("scheme", ["iid", "shards:2", "classes:2", "dirichlet:0.3"])
def test_deterministic_for_a_seed(scheme: str) -> None:
    y = digits_like()
    a = partition_indices(y, 10, scheme, seed=11)
    b = partition_indices(y, 10, scheme, seed=11)
    c = partition_indices(y, 10, scheme, seed=12)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("bad", ["", "iid:2", "shards", "shards:0", "shards:x", "classes:0", "classes:", "dirichlet:-1", "dirichlet:nan", "random"])
def test_bad_schemes_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_scheme(bad)


def test_more_peers_than_samples_is_refused() -> None:
    with pytest.raises(UsageError, match="cannot give each"):
        partition_indices(np.arange(5) % 2, 6, "iid", seed=0)


def test_labels_found_behind_any_dataset() -> None:
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    tensors = TensorDataset(torch.zeros(6, 2), y)
    assert dataset_labels(tensors).tolist() == y.tolist()
    assert dataset_labels(Subset(tensors, [5, 0, 3])).tolist() == [2, 0, 1]

    class WithTargets:
        targets = [3, 1, 2]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[int, int]:
            raise AssertionError("targets should be used, not iteration")

    assert dataset_labels(WithTargets()).tolist() == [3, 1, 2]

    class Plain:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(2), torch.nn.functional.one_hot(torch.tensor(i % 3), 3).float()

    assert dataset_labels(Plain()).tolist() == [0, 1, 2, 0]


def test_float_regression_targets_cannot_be_split_by_label() -> None:
    with pytest.raises(ValueError, match="not integers"):
        dataset_labels(TensorDataset(torch.zeros(3, 1), torch.tensor([0.5, 1.2, 3.3])))


def test_labels_of_a_dataset_of_dicts_or_longer_tuples_come_from_its_targets() -> None:
    """Items as a loader may yield them (README, Peer scripts): a dict keyed input/target raised KeyError: 1 (a
    traceback from `simulate --partition shards:K`); an (x, y, id) tuple gave y already."""

    class Dicts:
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input": torch.zeros(2), "target": torch.tensor(2 - i)}

    class Triples(Dicts):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:  # type: ignore[override]
            return torch.zeros(2), torch.tensor(i), 7

    assert dataset_labels(Dicts()).tolist() == [2, 1, 0]
    assert dataset_labels(Triples()).tolist() == [0, 1, 2]
