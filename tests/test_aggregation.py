"""Aggregation strategies: hand-computed examples, attacks, fallbacks, and the training-side hooks."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from quinkgl_cli.manifest import catalogue
from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.aggregation import (
    CONTROL_VARIATE_KEY,
    LABEL_ENTROPY_KEY,
    bounded_weights,
    coordinate_median,
    cosine,
    distance,
    krum_scores,
    norm_floor,
    pairwise_sq_distances,
    trimmed_mean,
)
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate


def make(name: str, f: int = 0, **params: object) -> Aggregator:
    entry = registry.resolve("aggregation", name)
    return registry.load(entry)(registry.build_params(entry, dict(params)), byzantine_f=f)


def upd(pid: str, values: list[float], samples: int = 10, round_: int = 1, local: bool = False, **meta: object) -> PeerUpdate:
    return PeerUpdate(pid, round_, torch.tensor(values, dtype=torch.float32), samples, meta=dict(meta), is_local=local)


LOCAL = upd("a", [0.0, 0.0], local=True)
LINE = [upd(pid, [float(i), -float(i)]) for i, pid in enumerate("bcd", start=1)]  # (1,-1) (2,-2) (3,-3)
# Far outside the honest points, yet inside every bound (the refusal at 100 x the 0.1-per-coordinate floor: 14.1
# from the origin; the norm cap at 3 x the round's lower median norm: 8.5; the clip at 4 x the median distance), so
# the robust rules see it as it is.
FAR = upd("x", [5.5, 5.5])
ALL = [e.name for e in catalogue._ENTRIES if e.kind == "aggregation"]


# ------------------------------------------------------------------ FedAvg family, hand-computed
def test_fedavg_weights_by_samples() -> None:
    out = make("FedAvg").aggregate(upd("a", [0, 0], 20, local=True), [upd("b", [4, 8], 30)], 1)
    assert torch.allclose(out.flat, torch.tensor([2.4, 4.8]))  # 20 : 30, inside the bound: exact
    assert out.used == ["a", "b"] and out.rejected == [] and out.note == ""
    out = make("FedAvg").aggregate(upd("a", [0, 0], 10, local=True), [upd("b", [4, 8], 10), upd("c", [8, 4], 30)], 1)
    assert torch.allclose(out.flat, torch.tensor([4 * 0.2 + 8 * 0.6, 8 * 0.2 + 4 * 0.6]))  # 10 : 10 : 30


def test_two_party_round_bounds_a_huge_sample_claim() -> None:
    # The local model and one peer claiming 2^31 samples: the mean-share bound 2/2 is void, the peer may still
    # weigh at most max_weight_ratio times the rest (the local model): 2/3, never the whole result.
    w = bounded_weights(torch.tensor([479.0, 2.0**31]), 2.0)
    assert torch.allclose(w, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    out = make("FedAvg").aggregate(upd("a", [0, 0], 479, local=True), [upd("x", [9, 9], 2**31)], 1)
    assert torch.allclose(out.flat, torch.tensor([6.0, 6.0]))
    # max_weight_ratio 1 turns a two-party round into plain averaging whatever the peer claims.
    out = make("FedAvg", max_weight_ratio=1.0).aggregate(upd("a", [0, 0], 479, local=True), [upd("x", [9, 9], 2**31)], 1)
    assert torch.allclose(out.flat, torch.tensor([4.5, 4.5]))
    # Honest, similar counts stay exactly sample-weighted.
    assert torch.allclose(bounded_weights(torch.tensor([479.0, 500.0]), 2.0), torch.tensor([479 / 979, 500 / 979], dtype=torch.float64))
    # A large max_weight_ratio voids the mean bound for several updates too; the rest still keeps its share.
    w = bounded_weights(torch.tensor([1.0, 1.0, 1.0, 1e9]), 9.0)
    assert float(w[3]) == pytest.approx(0.9) and torch.allclose(w[:3], torch.full((3,), 0.1 / 3, dtype=torch.float64))
    assert bounded_weights(torch.tensor([7.0]), 2.0).tolist() == [1.0]
    # The same bound holds for entropy claims (self-reported as well).
    agg = make("EntropyWeightedAvg")
    out = agg.aggregate(upd("a", [0, 0], local=True, label_entropy=0.5), [upd("x", [3, 3], label_entropy=16.0)], 1)
    assert torch.allclose(out.flat, torch.tensor([2.0, 2.0]))


def test_fedavg_bounds_a_huge_sample_claim() -> None:
    # Counts 10, 30, 2^32 with max_weight_ratio 2 (n = 3): the liar is capped at 2/3, the rest split 1:3.
    out = make("FedAvg").aggregate(LOCAL, [upd("b", [4, 4], 30), upd("c", [6, 6], 2**32)], 1)
    assert torch.allclose(out.flat, torch.tensor([0.25 * 4 + 2 / 3 * 6] * 2))


def test_bounded_weights_properties() -> None:
    w = bounded_weights(torch.tensor([1.0, 1.0, 1.0, 1e9]), 1.5)
    assert math.isclose(float(w.sum()), 1.0)
    assert float(w.max()) <= 1.5 / 4 + 1e-12
    assert torch.allclose(w[:3], torch.full((3,), (1 - 1.5 / 4) / 3, dtype=torch.float64))
    untouched = bounded_weights(torch.tensor([1.0, 2.0, 3.0]), 2.0)
    assert torch.allclose(untouched, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))


def test_fedavg_self_weight() -> None:
    out = make("FedAvg", self_weight=0.75).aggregate(LOCAL, [upd("b", [4, 4], 10), upd("c", [8, 8], 10)], 1)
    assert torch.allclose(out.flat, torch.tensor([0.125 * 4 + 0.125 * 8] * 2))


def test_staleness_weighting() -> None:
    # Local round 5, peer round 3: age 2, decay 0.5 -> weight e^-1 relative to the local's 1.
    agg = make("StalenessWeightedFedAvg", decay=0.5)
    out = agg.aggregate(upd("a", [0, 0], round_=5, local=True), [upd("b", [1, 2], round_=3)], 5)
    w = math.exp(-1.0) / (1.0 + math.exp(-1.0))
    assert torch.allclose(out.flat, torch.tensor([w, 2 * w]))


def test_entropy_weighted_average() -> None:
    agg = make("EntropyWeightedAvg", entropy_floor=0.5, fallback_weight=2.0)
    local = upd("a", [0, 0], local=True, label_entropy=1.0)
    out = agg.aggregate(local, [upd("b", [5, 5], label_entropy=1.5)], 1)
    assert torch.allclose(out.flat, torch.tensor([3.0, 3.0]))  # weights 1 : 1.5
    out = agg.aggregate(local, [upd("b", [4, 4], label_entropy=0.0)], 1)
    assert torch.allclose(out.flat, torch.tensor([4 * 0.5 / 1.5] * 2))  # floor 0.5
    out = agg.aggregate(local, [upd("b", [3, 3])], 1)
    assert torch.allclose(out.flat, torch.tensor([2.0, 2.0]))  # fallback weight 2
    assert "no label_entropy from b" in out.note
    for bogus in ("3.0", float("nan"), 99.0, True, -1.0):
        out = agg.aggregate(local, [upd("b", [3, 3], **{LABEL_ENTROPY_KEY: bogus})], 1)
        assert torch.allclose(out.flat, torch.tensor([2.0, 2.0])), bogus


def test_entropy_weights_are_bounded() -> None:
    # Three peers, one claiming the maximum entropy of 16 bits: capped at max_weight_ratio / n.
    agg = make("EntropyWeightedAvg", max_weight_ratio=1.5)
    others = [upd("b", [2, 2], label_entropy=1.0), upd("c", [3, 3], label_entropy=16.0)]
    out = agg.aggregate(upd("a", [0, 0], local=True, label_entropy=1.0), others, 1)
    assert torch.allclose(out.flat, torch.tensor([0.25 * 2 + 0.5 * 3] * 2))


def test_fedavgm_without_momentum_is_fedavg_and_keeps_state() -> None:
    plain = make("FedAvgM", server_momentum=0.0)
    assert torch.allclose(plain.aggregate(LOCAL, [upd("b", [2, 4])], 1).flat, torch.tensor([1.0, 2.0]))
    agg = make("FedAvgM", server_momentum=0.5, server_lr=1.0)
    first = agg.aggregate(LOCAL, [upd("b", [2, 2])], 1).flat  # delta (1,1), v = (1,1)
    assert torch.allclose(first, torch.tensor([1.0, 1.0]))
    second = agg.aggregate(upd("a", [1, 1], local=True), [upd("b", [3, 3])], 2).flat  # delta (1,1), v = (1.5,1.5)
    assert torch.allclose(second, torch.tensor([2.5, 2.5]))
    saved = agg.state_dict()
    restored = make("FedAvgM", server_momentum=0.5)
    restored.load_state_dict(saved)
    assert torch.allclose(restored.state_dict()["momentum"], torch.tensor([1.5, 1.5]))
    with pytest.raises(ValueError):
        restored.load_state_dict({"momentum": torch.tensor([float("nan")])})


# ------------------------------------------------------------------ robust rules, hand-computed
def test_krum_scores_and_choice() -> None:
    x = torch.stack([u.flat for u in [LOCAL, *LINE, FAR]])
    dist = pairwise_sq_distances(list(x))
    assert torch.allclose(dist, torch.cdist(x.double(), x.double()) ** 2, rtol=1e-6)
    # n = 5, f = 1: sum of squared distances to the 2 nearest.
    scores = krum_scores(dist, 1)
    assert torch.allclose(scores[:4], torch.tensor([10.0, 4.0, 4.0, 10.0], dtype=torch.float64))
    out = make("Krum", f=1).aggregate(LOCAL, [*LINE, FAR], 1)
    assert out.flat.tolist() == [1.0, -1.0] and out.used == ["b"]


def test_krum_distances_survive_large_norms() -> None:
    # Models far from the origin but close together: centring keeps the Gram trick exact enough to rank.
    base = torch.full((1000,), 1e4)
    x = torch.stack([base, base + 0.01, base + 0.02, base - 5.0])
    exact = torch.cdist(x.double(), x.double()) ** 2  # of the float32 values actually stored
    dist = pairwise_sq_distances(list(x))
    assert torch.allclose(dist, exact, rtol=1e-4, atol=1e-9)
    naive = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * (x @ x.T)  # uncentred float32 Gram
    assert not torch.allclose(naive.double(), exact, rtol=1e-1)


def test_multikrum_averages_the_m_best() -> None:
    out = make("MultiKrum", f=1, m=2).aggregate(LOCAL, [*LINE, FAR], 1)
    assert torch.allclose(out.flat, torch.tensor([1.5, -1.5])) and out.used == ["b", "c"]
    out = make("MultiKrum", f=1).aggregate(LOCAL, [*LINE, FAR], 1)  # m = n - f = 4: everyone but x
    assert torch.allclose(out.flat, torch.tensor([1.5, -1.5])) and "x" not in out.used


def test_trimmed_mean_and_median_by_hand() -> None:
    out = make("TrimmedMean", f=1).aggregate(LOCAL, [*LINE, FAR], 1)
    assert out.flat.tolist() == [2.0, -1.0]
    out = make("TrimmedMean", trim_ratio=0.2).aggregate(LOCAL, [*LINE, FAR], 1)  # ceil(0.2 * 5) = 1 per side
    assert out.flat.tolist() == [2.0, -1.0]
    assert make("Median").aggregate(LOCAL, [*LINE, FAR], 1).flat.tolist() == [2.0, -1.0]
    even = make("Median").aggregate(LOCAL, [*LINE], 1).flat  # 0,1,2,3 -> 1.5
    assert even.tolist() == [1.5, -1.5]
    x = torch.tensor([[5.0], [1.0], [4.0], [2.0], [3.0], [100.0]])
    assert trimmed_mean(list(x), 2).tolist() == [3.5]
    assert coordinate_median(list(x)).tolist() == [3.5]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 17, 33, 70])
def test_blockwise_median_and_trimmed_mean_match_torch_sort(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    cols = 140_001 if n <= 33 else 20_001  # ties; two blocks, the last one short (one for the sort path)
    x = torch.randn(n, cols, generator=g).round(decimals=1)
    before = x.clone()
    ordered = x.sort(dim=0).values
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    assert torch.allclose(coordinate_median(list(x)), median)
    k = (n - 1) // 3
    assert torch.allclose(trimmed_mean(list(x), k), ordered[k : n - k].mean(dim=0), atol=1e-6)
    assert torch.equal(x, before)  # the inputs are never sorted in place


# ------------------------------------------------------------------ fallbacks below the count
def test_krum_falls_back_to_median_with_too_few_updates() -> None:
    out = make("Krum", f=1).aggregate(LOCAL, [LINE[0], FAR], 1)
    assert out.flat.tolist() == [1.0, 0.0]
    assert "fell back to Median" in out.note and "2f+3=5" in out.note


def test_fallback_says_when_median_cannot_tolerate_f() -> None:
    out = make("MultiKrum", f=2).aggregate(LOCAL, [LINE[0], FAR], 1)
    assert "Median tolerates only 1 of f=2" in out.note


def test_two_updates_with_an_attacker_keep_the_local_model() -> None:
    for name in ("Krum", "MultiKrum", "TrimmedMean", "Median"):
        out = make(name, f=1).aggregate(LOCAL, [FAR], 1)
        assert out.flat.tolist() == [0.0, 0.0], name
        assert "kept local model" in out.note and out.used == ["a"], name


def test_without_attackers_two_updates_average() -> None:
    out = make("Krum", f=0).aggregate(LOCAL, [upd("b", [2, 2])], 1)
    assert out.flat.tolist() == [1.0, 1.0] and "fell back to mean" in out.note


def test_trimmed_mean_falls_back_to_median() -> None:
    out = make("TrimmedMean", f=2).aggregate(LOCAL, [*LINE], 1)  # 4 < 2f+1
    assert "fell back to Median" in out.note and out.flat.tolist() == [1.5, -1.5]


def test_trim_ratio_never_trims_fewer_than_f() -> None:
    # Two updates, f = 1: the ratio's ratio gives ceil(0.4 * 2) = 1 per side, max(1, f) = 1 needs 3 updates, so the fallback keeps the
    # local model instead of averaging with the attacker.
    out = make("TrimmedMean", f=1, trim_ratio=0.4).aggregate(LOCAL, [upd("x", [1e6, 1e6])], 1)
    assert out.flat.tolist() == [0.0, 0.0] and out.used == ["a"]
    assert "kept local model" in out.note and "2f+1=3" in out.note
    # Five updates, two far attackers, f = 2: the ratio alone (ceil(0.1 * 5) = 1) would let one through.
    far = [upd("x", [9.0, 9.0]), upd("y", [9.0, 9.0])]  # clipped to 4 x the median distance: (8, 8)
    out = make("TrimmedMean", f=2, trim_ratio=0.1).aggregate(LOCAL, [*LINE[:2], *far], 1)
    assert out.flat.tolist() == [2.0, 0.0]  # middle values of 0 1 2 8 8 and of -2 -1 0 8 8
    assert "raised to f=2" in out.note


def test_trim_ratio_beyond_the_count_falls_back_and_says_so() -> None:
    # ceil(0.4 * 4) = 2 per side needs 5 updates: Median of the four, and the note names the ratio.
    out = make("TrimmedMean", trim_ratio=0.4).aggregate(LOCAL, [*LINE], 1)
    assert out.flat.tolist() == [1.5, -1.5]
    assert "fell back to Median" in out.note and "k=2 from trim_ratio=0.4" in out.note
    # With f = 0 two updates still average, and say why.
    out = make("TrimmedMean", trim_ratio=0.4).aggregate(LOCAL, [upd("b", [2, 2])], 1)
    assert out.flat.tolist() == [1.0, 1.0] and "fell back to mean" in out.note
    # Float noise does not trim one more: ceil(0.1 * 30) is 3, so 30 updates keep 24.
    many = [upd(f"p{i}", [100.0 + i, 0.0]) for i in range(1, 30)]
    out = make("TrimmedMean", trim_ratio=0.1).aggregate(upd("a", [100.0, 0.0], local=True), many, 1)
    assert out.note == "" and out.flat.tolist() == [114.5, 0.0]


def test_median_says_it_cannot_tolerate_f() -> None:
    out = make("Median", f=2).aggregate(LOCAL, [LINE[0], LINE[1]], 1)
    assert "Median tolerates only 1 of f=2" in out.note and out.flat.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_survives_only_the_local_model(name: str) -> None:
    out = make(name, f=1).aggregate(LOCAL, [], 1)
    assert out.flat.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_rejects_malformed_updates(name: str) -> None:
    bad = [
        upd("nan", [float("nan"), 0.0]),
        upd("inf", [float("inf"), 0.0]),
        upd("short", [1.0]),
        upd("neg", [1.0, 1.0], samples=-5),
        upd("b", [9.0, 9.0]),  # duplicate of LINE's b
        upd("a", [9.0, 9.0]),  # echo of the local id
    ]
    out = make(name).aggregate(LOCAL, [*LINE, *bad], 1)
    assert set(out.rejected) == {"nan", "inf", "short", "neg", "b", "a"}
    assert torch.isfinite(out.flat).all()
    assert not set(out.used) & {"nan", "inf", "short", "neg"}
    assert 0.0 <= float(out.flat[0]) <= 3.0


# ------------------------------------------------------------------ attacks
HONEST_N, D = 7, 64


def _honest() -> list[PeerUpdate]:
    g = torch.Generator().manual_seed(3)
    center = torch.linspace(-2, 2, D)
    return [
        PeerUpdate(f"h{i}", 1, center + 0.1 * torch.randn(D, generator=g), 100, is_local=(i == 0))
        for i in range(HONEST_N)
    ]


def _attackers(kind: str, honest: list[PeerUpdate]) -> list[PeerUpdate]:
    g = torch.Generator().manual_seed(9)
    mean = torch.stack([u.flat for u in honest]).mean(0)
    make_flat = {
        "sign_flip": lambda: -10.0 * mean,
        "scaled": lambda: 100.0 * mean,
        "nan": lambda: torch.full((D,), float("nan")),
        "random": lambda: 50.0 * torch.randn(D, generator=g),
    }[kind]
    return [PeerUpdate(f"z{i}", 1, make_flat(), 10**6) for i in range(2)]


@pytest.mark.parametrize("kind", ["sign_flip", "scaled", "nan", "random"])
@pytest.mark.parametrize("name", ["Krum", "MultiKrum", "TrimmedMean", "Median"])
def test_robust_rules_stay_in_the_honest_range(name: str, kind: str) -> None:
    honest = _honest()
    bad = _attackers(kind, honest)
    h = torch.stack([u.flat for u in honest])
    lo, hi = h.min(0).values, h.max(0).values
    out = make(name, f=2).aggregate(honest[0], [*honest[1:], *bad], 1)
    assert all(part.startswith(("rejected", "clipped")) for part in out.note.split("; ") if part), out.note
    assert bool(((out.flat >= lo - 1e-6) & (out.flat <= hi + 1e-6)).all()), (name, kind)
    if kind == "nan":
        assert set(out.rejected) == {"z0", "z1"}


def test_fedavg_scales_boosted_models_down_to_the_honest_size() -> None:
    # Sign flips and noise are refused by their direction; a boosted model keeps the honest direction, and the
    # distance clip alone would leave it a model norm of pull (over half the coordinates outside the honest range).
    honest = _honest()
    h = torch.stack([u.flat for u in honest])
    lo, hi = h.min(0).values, h.max(0).values
    out = make("FedAvg").aggregate(honest[0], [*honest[1:], *_attackers("scaled", honest)], 1)
    assert "clipped z0:norm" in out.note and "z1:norm" in out.note and not out.rejected, out.note
    outside = (out.flat < lo - 1e-4) | (out.flat > hi + 1e-4)
    assert float(outside.float().mean()) < 0.1
    norms = [float(u.flat.norm()) for u in honest]
    assert min(norms) <= float(out.flat.norm()) <= max(norms)
    # A peer whose own model is still small (a late joiner) keeps its partners' larger models whole.
    small = PeerUpdate("late", 1, 0.1 * honest[0].flat, 100, is_local=True)
    assert "clipped" not in make("FedAvg").aggregate(small, honest[1:], 1).note


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_refuses_models_pointing_away_from_the_local_one(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A sign flip is as far as honest peers are from each other once clipped; its direction gives it away.
    honest = _honest()
    flipped = [PeerUpdate(f"z{i}", 1, -1.0 * u.flat, 100) for i, u in enumerate(honest[1:3])]
    clean = make(name, f=2).aggregate(honest[0], honest[1:], 1)
    with caplog.at_level(logging.WARNING, logger="quinkgl.strategies"):
        out = make(name, f=2).aggregate(honest[0], [*honest[1:], *flipped], 1)
    assert set(out.rejected) == {"z0", "z1"} and "rejected z0:cosine" in out.note, out.note
    assert torch.allclose(out.flat, clean.flat), name
    refused = [r.qgl_fields for r in caplog.records if r.qgl_event == "update-refused"]  # type: ignore[attr-defined]
    assert [f["peer"] for f in refused] == ["z0", "z1"] and all(f["cosine"] < -0.99 for f in refused)


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_refuses_huge_noise_but_not_a_boosted_honest_model(name: str) -> None:
    # N(0, 1) weights: far larger than the model and pointing nowhere. x10 of an honest model: as large, but it
    # keeps the honest direction and is left to the distance bounds.
    honest = _honest()
    g = torch.Generator().manual_seed(11)
    noise = [PeerUpdate(f"z{i}", 1, 10.0 * torch.randn(D, generator=g), 100) for i in range(2)]
    boosted = PeerUpdate("boost", 1, 10.0 * honest[1].flat, 100)
    out = make(name, f=2).aggregate(honest[0], [*honest[1:], *noise, boosted], 1)
    assert {"z0", "z1"} <= set(out.rejected) and "rejected z0:norm" in out.note, out.note
    assert "boost" not in out.rejected or "boost:distance" in out.note, out.note
    # Without an aligned partner (the local model is the odd one out) nothing is judged by direction.
    odd = PeerUpdate("odd", 1, torch.randn(D, generator=g), 100, is_local=True)
    assert make("FedAvg").aggregate(odd, noise, 1).rejected == []


def test_a_model_slightly_against_the_local_one_is_kept() -> None:
    # Honest models of tiny networks on one class per peer start slightly anti-aligned (cosine down to -0.17 in
    # tests/test_learning.py's swarms): only clear opposition is refused.
    honest = _honest()
    local = honest[0].flat
    g = torch.Generator().manual_seed(4)
    other = torch.randn(D, generator=g)
    other -= (other @ local) / (local @ local) * local  # orthogonal to the local model, then tilted against it
    other = other / other.norm() * local.norm()
    tilted = PeerUpdate("tilted", 1, other - 0.15 * local, 100)
    assert -0.3 < cosine(tilted.flat, local) < -0.1
    out = make("FedAvg").aggregate(honest[0], [honest[1], tilted], 1)
    assert "tilted" not in out.rejected


def test_a_peer_aligned_with_none_of_its_partners_joins_them_instead_of_refusing_them() -> None:
    # The local model started elsewhere (other initial weights, or zero and other classes): every partner points
    # away from it, none is aligned with it, so none is refused and the average pulls it into the swarm.
    honest = _honest()
    odd = PeerUpdate("odd", 1, -1.0 * honest[0].flat, 100, is_local=True)
    out = make("FedAvg").aggregate(odd, honest[1:], 1)
    assert out.rejected == [] and set(out.used) >= {u.peer_id for u in honest[1:]}
    assert cosine(out.flat, honest[1].flat) > 0.5
    # One aligned partner is enough to tell the odd one out among the others.
    mixed = make("FedAvg").aggregate(honest[0], [honest[1], PeerUpdate("z", 1, -1.0 * honest[2].flat, 100)], 1)
    assert mixed.rejected == ["z"]


def test_cosine_survives_huge_values_and_zero_vectors() -> None:
    a = torch.full((D,), 3e38)
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(torch.zeros(D), a) == 0.0


HUGE = [1e30, -1e30, 3e38]  # finite float32 values; 3e38 minus the local model overflows to inf


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_refuses_huge_finite_updates(name: str, value: float) -> None:
    honest = _honest()
    poison = [PeerUpdate(f"z{i}", 1, torch.full((D,), value), 100) for i in range(2)]
    clean = make(name, f=2).aggregate(honest[0], honest[1:], 1)
    out = make(name, f=2).aggregate(honest[0], [*honest[1:], *poison], 1)
    assert bool(torch.isfinite(out.flat).all()), name
    assert set(out.rejected) == {"z0", "z1"} and "rejected z0:distance" in out.note, out.note
    assert torch.allclose(out.flat, clean.flat), name  # exactly what the honest updates alone give
    # One honest peer and one poisoned: nothing to take a median from, the refusal alone holds.
    alone = make(name, f=0).aggregate(honest[0], [honest[1], poison[0]], 1)
    assert bool(torch.isfinite(alone.flat).all()) and alone.rejected == ["z0"], name
    assert distance(alone.flat, honest[0].flat) <= distance(honest[1].flat, honest[0].flat)


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_refuses_untrained_and_zeroed_models(name: str) -> None:
    # A member sending an untrained initialisation (an unrelated direction, half the honest norm) or zeros: neither
    # is far by distance (both lie about one model norm from every model), both are far below the round's norms.
    honest = _honest()
    g = torch.Generator().manual_seed(5)
    init = torch.randn(D, generator=g)
    init *= 0.5 * float(honest[0].flat.norm()) / float(init.norm())
    junk = [PeerUpdate("init", 1, init, 100), PeerUpdate("zero", 1, torch.zeros(D), 100)]
    clean = make(name, f=2).aggregate(honest[0], honest[1:], 1)
    out = make(name, f=2).aggregate(honest[0], [*honest[1:], *junk], 1)
    assert set(out.rejected) == {"init", "zero"} and "rejected init:norm" in out.note, out.note
    assert torch.allclose(out.flat, clean.flat), name


def test_the_norm_floor_refuses_nothing_where_honest_norms_spread() -> None:
    assert norm_floor([6.0, 3.0]) == -math.inf  # two norms: nothing to take a median from
    assert norm_floor([6.0, 6.1, 5.9, 6.0]) == pytest.approx(6.0 / 1.5)
    # A late joiner (its own model still the small initial one) refuses none of the trained models it hears ...
    late = PeerUpdate("a", 1, torch.full((D,), 0.2), 100, is_local=True)
    trained = [PeerUpdate(f"t{i}", 1, torch.full((D,), 1.0 + 0.01 * i), 100) for i in range(3)]
    assert make("FedAvg").aggregate(late, trained, 1).rejected == []
    # ... and models spread in norm as widely as their distances (near zero, at different stages) are all kept.
    assert norm_floor([0.0, 1.0, 2.0, 3.0, 4.0]) < 0.0


def test_refused_and_clipped_updates_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    honest = _honest()
    mean = torch.stack([u.flat for u in honest]).mean(0)
    scaled = PeerUpdate("s", 1, 2.5 * mean, 100)  # 1.5 norms away, under the norm cap: clipped by distance
    boosted = PeerUpdate("b", 1, 50.0 * mean, 100)  # ~50 norms away: inside the refusal bound, scaled down
    huge = PeerUpdate("z", 1, torch.full((D,), 1e30), 100)
    with caplog.at_level(logging.WARNING, logger="quinkgl.strategies"):
        out = make("FedAvg").aggregate(honest[0], [*honest[1:], scaled, boosted, huge], 1)
    events = {r.qgl_event: r.qgl_fields for r in caplog.records}  # type: ignore[attr-defined]
    assert events["update-refused"]["peer"] == "z" and events["update-clipped"]["peer"] == "s"
    clipped = events["update-clipped"]
    assert clipped["distance"] > clipped["limit"] and "s:distance" in out.note and "s" in out.used
    assert distance(out.flat, honest[0].flat) < clipped["limit"]
    capped = events["update-scaled"]
    assert capped["peer"] == "b" and capped["norm"] >= capped["limit"] == pytest.approx(3 * capped["to"])
    assert "clipped b:norm" in out.note and "b" in out.used


def test_honest_updates_are_neither_clipped_nor_refused() -> None:
    honest = _honest()
    for name in ALL:
        out = make(name, f=2).aggregate(honest[0], honest[1:], 1)
        assert out.rejected == [] and "clipped" not in out.note, (name, out.note)
    # A model near zero (a zero-initialised linear model) still accepts honest updates of ordinary size.
    zero = PeerUpdate("a", 1, torch.zeros(D), 10, is_local=True)
    out = make("FedAvg").aggregate(zero, [PeerUpdate("b", 1, torch.full((D,), 0.5), 10)], 1)
    assert out.rejected == [] and torch.allclose(out.flat, torch.full((D,), 0.25))


def test_scaffold_refuses_a_huge_control_variate(caplog: pytest.LogCaptureFixture) -> None:
    honest = _honest()
    agg = make("Scaffold")
    agg.c_local = torch.full((D,), 0.01)  # type: ignore[attr-defined]
    good = {CONTROL_VARIATE_KEY: torch.full((D,), 0.02)}
    bad = {CONTROL_VARIATE_KEY: torch.full((D,), 1e30)}
    others = [replace(honest[1], extras=good), replace(honest[2], extras=bad)]
    with caplog.at_level(logging.WARNING, logger="quinkgl.strategies"):
        out = agg.aggregate(honest[0], others, 1)
    assert "no usable control variate from h2" in out.note
    assert any(getattr(r, "qgl_event", "") == "variate-refused" for r in caplog.records)
    assert torch.allclose(agg.c_global, torch.full((D,), 0.015))  # type: ignore[attr-defined]


# ------------------------------------------------------------------ training-side hooks
class Point(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(d))


def test_fedprox_term_changes_the_local_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    agg = make("FedProx", mu=0.5)
    agg.begin_training(model, 0.1)
    anchor = [q.detach().clone() for q in model.parameters()]
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    x = torch.randn(4, 3)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    plain = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    term = agg.loss_term(model)
    assert term is not None
    (model(x).pow(2).sum() + term).backward()
    for q, a, g in zip(model.parameters(), anchor, plain, strict=True):
        assert torch.allclose(q.grad - g, 0.5 * (q.detach() - a))  # d/dw mu/2 ||w - w0||^2
    assert math.isclose(float(term.detach()), 0.25 * sum(q.numel() for q in model.parameters()), rel_tol=1e-6)
    assert make("FedProx", mu=0.0).loss_term(model) is None


def _quadratic_swarm(name: str, rounds: int, steps: int = 10, lr: float = 0.1, momentum: float = 0.0) -> float:
    """Four peers with f_i(x) = a_i/2 ||x - b_i||^2 (non-IID: different curvatures and optima), complete gossip.

    Returns the distance of the peers' mean model to the global optimum sum(a_i b_i) / sum(a_i).
    """
    g = torch.Generator().manual_seed(1)
    d = 5
    curv = [0.2, 1.0, 3.0, 5.0]
    targets = [5.0 * torch.randn(d, generator=g) for _ in curv]
    optimum = sum(a * b for a, b in zip(curv, targets, strict=True)) / sum(curv)
    models = [Point(d) for _ in curv]
    aggs = [make(name) for _ in curv]
    for r in range(1, rounds + 1):
        for model, agg, a, b in zip(models, aggs, curv, targets, strict=True):
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            agg.begin_training(model, lr)
            for _ in range(steps):
                opt.zero_grad()
                loss = 0.5 * a * (model.x - b).pow(2).sum()
                extra = agg.loss_term(model)
                (loss if extra is None else loss + extra).backward()
                agg.after_backward(model)
                opt.step()
            agg.end_training(model, steps, lr)
        sent = [
            PeerUpdate(f"p{i}", r, model.x.detach().clone(), 10, extras=agg.extras_to_send())
            for i, (model, agg) in enumerate(zip(models, aggs, strict=True))
        ]
        results = []
        for i, agg in enumerate(aggs):
            local = PeerUpdate(f"p{i}", r, sent[i].flat, 10, is_local=True)
            results.append(agg.aggregate(local, [u for j, u in enumerate(sent) if j != i], r).flat)
        for model, flat in zip(models, results, strict=True):
            with torch.no_grad():
                model.x.copy_(flat)
    mean = torch.stack([m.x.detach() for m in models]).mean(0)
    return float((mean - optimum).norm())


@pytest.mark.parametrize(("momentum", "lr"), [(0.0, 0.05), (0.5, 0.05), (0.9, 0.01)])
def test_scaffold_beats_plain_local_sgd_on_non_iid_quadratics(momentum: float, lr: float) -> None:
    plain = _quadratic_swarm("FedAvg", rounds=40, lr=lr, momentum=momentum)
    scaffold = _quadratic_swarm("Scaffold", rounds=40, lr=lr, momentum=momentum)
    assert plain > 0.2  # client drift: local steps pull toward each peer's own optimum
    assert scaffold < 0.05 * plain


def test_scaffold_corrects_gradients_and_checkpoints() -> None:
    agg = make("Scaffold")
    model = Point(3)
    agg.load_state_dict({"c_local": torch.tensor([1.0, 0.0, 0.0]), "c_global": torch.tensor([0.0, 2.0, 0.0])})
    agg.begin_training(model, 0.1)
    for grad in ([1.0, 1.0, 1.0], [3.0, 1.0, 0.0]):
        model.x.grad = torch.tensor(grad)
        agg.after_backward(model)
        assert model.x.grad.tolist() == [grad[0] - 1.0, grad[1] + 2.0, grad[2]]  # g + c - c_i
    agg.end_training(model, steps=2, lr=0.1)  # c_i <- mean of the uncorrected gradients
    assert torch.allclose(agg.extras_to_send()[CONTROL_VARIATE_KEY], torch.tensor([2.0, 1.0, 0.5]))
    peer = PeerUpdate("b", 1, torch.zeros(3), 10, extras={CONTROL_VARIATE_KEY: torch.tensor([0.0, 1.0, 1.5])})
    broken = PeerUpdate("c", 1, torch.zeros(3), 10, extras={CONTROL_VARIATE_KEY: torch.zeros(7)})
    out = agg.aggregate(PeerUpdate("a", 1, model.x.detach().clone(), 10, is_local=True), [peer, broken], 1)
    assert "no usable control variate from c" in out.note
    # c <- 0.5 c + 0.5 mean((2,1,0.5), (0,1,1.5)) = 0.5 (0,2,0) + 0.5 (1,1,1)
    state = agg.state_dict()
    assert torch.allclose(state["c_global"], torch.tensor([0.5, 1.5, 0.5]))
    other = make("Scaffold")
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["c_local"], state["c_local"])
    with pytest.raises(ValueError):
        other.load_state_dict({"bogus": torch.zeros(1)})


def test_scaffold_first_mean_is_taken_whole() -> None:
    agg = make("Scaffold")
    model = Point(2)
    agg.begin_training(model, 0.1)
    model.x.grad = torch.tensor([2.0, 4.0])
    agg.after_backward(model)
    agg.end_training(model, steps=1, lr=0.1)
    peer = PeerUpdate("b", 1, torch.zeros(2), 10, extras={CONTROL_VARIATE_KEY: torch.tensor([0.0, 0.0])})
    agg.aggregate(PeerUpdate("a", 1, torch.zeros(2), 10, is_local=True), [peer], 1)
    assert torch.allclose(agg.state_dict()["c_global"], torch.tensor([1.0, 2.0]))


def test_registry_builds_every_aggregator_with_defaults() -> None:
    for name in ALL:
        agg = make(name, f=1)
        assert agg.name == name
        assert isinstance(agg.state_dict(), dict)
