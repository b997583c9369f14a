"""Data fingerprints: the privacy transforms, the wire format, entropy and similarity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.strategies.fingerprint import (
    Fingerprint,
    bucket_entropy,
    component_similarities,
    compute_fingerprint,
    fingerprint_for,
    label_buckets,
    label_entropy,
    parse_fingerprint,
    sample_bucket,
    similarity,
)


def loader(x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def data(classes: list[int], n: int = 200, d: int = 8, shift: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    x = torch.randn(n, d, generator=g) + shift
    return x, y


def test_label_buckets_and_entropy_by_hand() -> None:
    # 10 classes, uniform share 0.1: 0 -> absent, 0.04 -> low, 0.1 -> medium, 0.3 -> high.
    assert label_buckets([0, 4, 10, 30, 10, 10, 10, 10, 8, 8]) == (0, 1, 2, 3, 2, 2, 2, 2, 2, 2)
    assert bucket_entropy((2,) * 10) == pytest.approx(math.log2(10), abs=1e-3)
    assert bucket_entropy((3, 0, 0)) == 0.0
    assert bucket_entropy((3, 3, 0, 0)) == 1.0
    assert label_entropy([50, 50, 0, 0, 0, 0, 0, 0, 0, 0]) == 1.0
    # Entropy comes from the buckets: 60/40 and 50/50 look the same, which is the point.
    assert label_entropy([60, 40]) == label_entropy([50, 50])
    assert [sample_bucket(n) for n in (0, 9, 10, 999, 1000, 5 * 10**6)] == ["<10", "<10", "10-100", "100-1k", "1k-10k", ">=1M"]


def test_fingerprint_without_noise_reports_exact_group_moments() -> None:
    x = torch.arange(8, dtype=torch.float32).repeat(4, 1)  # every sample is 0..7: variance 0
    x[:2] += 1.0  # first two samples shifted: per-feature variance 0.25
    y = torch.tensor([0, 0, 1, 1])
    fp = compute_fingerprint(loader(x, y, batch=3), num_classes=3, noise=0.0, moment_groups=2)
    assert fp.labels == (3, 3, 0) and fp.entropy == 1.0 and fp.samples == "<10"
    # groups: features 0-3 (means 0.5..3.5 -> 2.0), features 4-7 (-> 6.0); variance 0.25 everywhere
    assert fp.moments == ((2.0, 0.25), (6.0, 0.25))
    assert fp.gradient is None


def test_noise_is_calibrated_and_seeded() -> None:
    x, y = data([0, 1, 2], n=300)
    quiet = compute_fingerprint(loader(x, y), num_classes=3, noise=0.0)
    a = compute_fingerprint(loader(x, y), num_classes=3, noise=0.5, generator=torch.Generator().manual_seed(1))
    b = compute_fingerprint(loader(x, y), num_classes=3, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert a == b and a != quiet
    gaps = [abs(m1 - m0) for (m1, _), (m0, _) in zip(a.moments, quiet.moments, strict=True)]
    assert max(gaps) < 3.0 and sum(gaps) > 0  # noise of scale 0.5 std (std ~ 1 here)


def test_wire_body_is_small_typed_and_round_trips() -> None:
    x, y = data(list(range(10)), n=500, d=64)
    model = nn.Linear(64, 10)
    fp = compute_fingerprint(loader(x, y), num_classes=10, gradient_moments=True, model=model,
                             loss_fn=nn.functional.cross_entropy, generator=torch.Generator().manual_seed(0))
    body = fp.to_body()
    assert all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in body.values())
    assert len(json.dumps(body)) < 700
    assert body["labels"] == "2222222222" and body["samples"] == "100-1k" and "grad" in body
    assert parse_fingerprint(json.loads(json.dumps(body))) == fp
    assert all(q.grad is None for q in model.parameters())  # the model is left untouched


def test_gradient_moments_need_a_model() -> None:
    x, y = data([0, 1])
    with pytest.raises(ValueError, match="gradient moments"):
        compute_fingerprint(loader(x, y), gradient_moments=True)


def test_label_kinds() -> None:
    x, y = data([0, 1, 2, 3], n=40)
    one_hot = nn.functional.one_hot(y, 4).float()
    assert compute_fingerprint(loader(x, one_hot), noise=0).labels == (2, 2, 2, 2)
    regression = compute_fingerprint(loader(x, y.float()), noise=0)
    assert regression.labels == () and regression.entropy == 0.0
    with pytest.raises(ValueError, match="out of range"):
        compute_fingerprint(loader(x, y), num_classes=2)
    with pytest.raises(ValueError, match="no samples"):
        compute_fingerprint([], num_classes=2)


@pytest.mark.parametrize(
    "patch",
    [
        {"fp": 2},
        {"labels": "12a"},
        {"labels": "1" * 5000},
        {"samples": "lots"},
        {"entropy": float("nan")},
        {"entropy": 99},
        {"entropy": True},
        {"moments": "1:2,3"},
        {"moments": "nan:1"},
        {"moments": ",".join(["1:1"] * 300)},
        {"grad": 5},
    ],
)
def test_parse_rejects_malformed_bodies(patch: dict[str, object]) -> None:
    body = Fingerprint((3, 3, 0), 1.0, "10-100", ((0.0, 1.0),)).to_body()
    body.update(patch)
    with pytest.raises(ValueError):
        parse_fingerprint(body)


def test_similarity_orders_peers_by_data() -> None:
    g = torch.Generator().manual_seed(0)
    mine = compute_fingerprint(loader(*data([0, 1], seed=1)), num_classes=10, generator=g)
    twin = compute_fingerprint(loader(*data([0, 1], seed=2)), num_classes=10, generator=g)
    other = compute_fingerprint(loader(*data([7, 8], shift=3.0, seed=3)), num_classes=10, generator=g)
    assert similarity(mine, mine.to_body()) == pytest.approx(1.0)
    assert similarity(mine, twin) > 0.85
    assert similarity(mine, other) < 0.3
    parts = component_similarities(mine, other)
    assert parts["label"] == pytest.approx(0.0) and parts["gradient"] is None
    assert similarity(Fingerprint((), 0.0, "<10", ()), Fingerprint((), 0.0, "<10", ())) == 0.5


def test_fingerprint_for_follows_the_manifest() -> None:
    from types import SimpleNamespace

    manifest = SimpleNamespace(
        task=SimpleNamespace(type="classification", label_type="integer", output_shape=(10,)),
        privacy=SimpleNamespace(fingerprint_noise=0.0, gradient_moments=False),
    )
    x, y = data([3, 4])
    fp = fingerprint_for(manifest, loader(x, y))
    assert fp.labels == (0, 0, 0, 3, 3, 0, 0, 0, 0, 0) and fp.entropy == 1.0 and fp.gradient is None
    assert fp == compute_fingerprint(loader(x, y), num_classes=10, noise=0.0)
    regression = SimpleNamespace(
        task=SimpleNamespace(type="regression", label_type="float", output_shape=(1,)),
        privacy=SimpleNamespace(fingerprint_noise=0.1, gradient_moments=False),
    )
    assert fingerprint_for(regression, loader(x, y.float())).labels == ()
