"""Local DP: the tutorial's noise calibration, clipping, the RDP accountant against dp-accounting's reference
values and independent bounds, the total budget, and checkpointed spending."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quinkgl_cli.manifest.schema import PrivacySpec
from quinkgl_cli.strategies.privacy import BudgetExhausted, LocalDP, clip_to_norm, gaussian_sigma, rdp_epsilon

dp_accounting = pytest.importorskip("dp_accounting")


def test_sigma_is_the_tutorials_calibration() -> None:
    assert gaussian_sigma(2.0, 1.0, 1e-5) == pytest.approx(2.0 * math.sqrt(2.0 * math.log(125_000.0)))
    dp = LocalDP(PrivacySpec(dp_epsilon=4.0, dp_delta=1e-5, dp_clip_norm=2.0), seed=0)
    assert dp.sigma == pytest.approx(2.0 * 4.84481 / 4.0, rel=1e-5)
    assert dp.noise_multiplier == pytest.approx(4.84481 / 4.0, rel=1e-5)


def test_noise_std_matches_the_formula_empirically() -> None:
    spec = PrivacySpec(dp_epsilon=2.0, dp_delta=1e-5, dp_clip_norm=0.5)
    dp = LocalDP(spec, seed=1)
    start = torch.randn(400_000, generator=torch.Generator().manual_seed(2))
    out = dp.sanitize(start, start.clone())  # zero update: what comes out is the noise
    noise = (out - start).double()
    expected = 0.5 * math.sqrt(2 * math.log(1.25e5)) / 2.0
    # The sample std of 400k normals is within 0.5% of the truth with overwhelming probability.
    assert float(noise.std()) == pytest.approx(expected, rel=0.005)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(400_000)


def test_clipping_scales_large_updates_and_keeps_small_ones() -> None:
    v = torch.full((100,), 1.0)  # norm 10
    clipped, norm = clip_to_norm(v, 2.0)
    assert norm == pytest.approx(10.0)
    assert float(clipped.norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped / clipped.norm(), v / v.norm())
    small, _ = clip_to_norm(v * 0.01, 2.0)
    assert torch.equal(small, v * 0.01)
    dp = LocalDP(PrivacySpec(dp_epsilon=1e9, dp_clip_norm=2.0), seed=0)  # negligible noise
    start = torch.zeros(100)
    out = dp.sanitize(start, v)
    assert float(out.norm()) == pytest.approx(2.0, rel=1e-4) and dp.last_clipped and dp.last_norm == pytest.approx(10.0)


def test_mask_limits_clipping_and_noise_to_the_entries_that_train() -> None:
    dp = LocalDP(PrivacySpec(dp_epsilon=1.0, dp_clip_norm=1.0), seed=0)
    mask = torch.arange(1000) >= 400
    start = torch.zeros(1000)
    trained = torch.full((1000,), 5.0)
    out = dp.sanitize(start, trained, mask)
    assert torch.equal(out[:400], start[:400])
    assert dp.last_norm == pytest.approx(5.0 * 600**0.5)  # the norm of the trainable part only
    assert float((out[400:] - 5.0 / 600**0.5).std()) == pytest.approx(dp.sigma, rel=0.1)


def test_disabled_dp_changes_nothing() -> None:
    dp = LocalDP(PrivacySpec(), seed=0)
    x = torch.randn(10)
    assert dp.sanitize(torch.zeros(10), x) is x
    assert dp.metrics() == {} and dp.spent() == (0.0, 0.0) and not dp.exhausted


def _reference(z: float, rounds: int, delta: float) -> float:
    """dp-accounting's RDP accountant, composed one round at a time as the node does."""
    acc = dp_accounting.rdp.RdpAccountant()
    for _ in range(rounds):
        acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("eps0", [8.0, 4.0, 2.0, 1.0])
def test_accountant_agrees_with_library_reference(eps0: float) -> None:
    spec = PrivacySpec(dp_epsilon=eps0, dp_delta=1e-5, dp_clip_norm=2.0)  # the tutorial's sweep
    dp = LocalDP(spec, seed=0)
    x = torch.zeros(8)
    spent = []
    for _ in range(20):
        x = dp.sanitize(x, x + 1.0)
        spent.append(dp.spent()[0])
    assert dp.spent()[1] == 1e-5
    assert spent == sorted(spent) and spent[0] > 0
    for r in (1, 5, 20):
        assert spent[r - 1] == pytest.approx(_reference(dp.noise_multiplier, r, 1e-5), rel=1e-9)


def test_accountant_reference_values() -> None:
    """Pinned values (dp-accounting 0.6 RDP accountant) for the tutorial's settings, delta = 1e-5, 20 rounds."""
    z = {eps: math.sqrt(2 * math.log(1.25e5)) / eps for eps in (8.0, 4.0, 2.0, 1.0)}
    assert rdp_epsilon(z[1.0], 20, 1e-5) == pytest.approx(4.314, abs=2e-3)
    assert rdp_epsilon(z[2.0], 20, 1e-5) == pytest.approx(9.732, abs=2e-3)
    assert rdp_epsilon(z[4.0], 20, 1e-5) == pytest.approx(23.323, abs=2e-3)
    assert rdp_epsilon(z[8.0], 20, 1e-5) == pytest.approx(61.05, abs=2e-2)


@pytest.mark.parametrize("z,rounds", [(4.8448, 1), (4.8448, 20), (1.2112, 20)])
def test_accountant_sits_between_exact_and_textbook_bounds(z: float, rounds: int) -> None:
    delta = 1e-5
    eps = rdp_epsilon(z, rounds, delta)
    # Lower: the PLD accountant is (near) exact for composed Gaussians; RDP can only be looser.
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert float(pld.get_epsilon(delta)) <= eps * 1.001
    # Upper: the textbook RDP conversion of the Gaussian's RDP (alpha / 2z^2 per release, Mironov 2017).
    alphas = np.linspace(1.01, 2000, 400_000)
    textbook = float(np.min(rounds * alphas / (2 * z * z) + math.log(1 / delta) / (alphas - 1)))
    assert eps <= textbook + 1e-9
    assert eps > 0.5 * textbook  # and not absurdly below it


@pytest.mark.parametrize("eps0", [1.0, 0.5, 0.1])
def test_single_release_meets_its_nominal_epsilon(eps0: float) -> None:
    """For epsilon <= 1 the classic calibration is a valid (eps0, delta) Gaussian mechanism: the exact epsilon
    (Balle & Wang 2018, in dp-accounting) of one release is at most eps0."""
    z = math.sqrt(2 * math.log(1.25e5)) / eps0
    assert dp_accounting.get_epsilon_gaussian(z, 1e-5) <= eps0


def test_total_budget_stops_releases_before_it_is_exceeded() -> None:
    spec = PrivacySpec(dp_epsilon=1.0, dp_delta=1e-5, dp_clip_norm=1.0, dp_total_epsilon=3.0)
    dp = LocalDP(spec, seed=0)
    limit = dp.max_releases
    assert limit is not None and limit > 1
    assert rdp_epsilon(dp.noise_multiplier, limit, 1e-5) <= 3.0 < rdp_epsilon(dp.noise_multiplier, limit + 1, 1e-5)
    x = torch.zeros(4)
    for _ in range(limit):
        assert not dp.exhausted
        x = dp.sanitize(x, x + 0.1)
    assert dp.exhausted and dp.spent()[0] <= 3.0
    assert dp.metrics()["dp_exhausted"] is True
    with pytest.raises(BudgetExhausted):
        dp.sanitize(x, x + 0.1)
    assert dp.releases == limit


def test_budget_too_small_for_one_release() -> None:
    dp = LocalDP(PrivacySpec(dp_epsilon=1.0, dp_total_epsilon=0.1), seed=0)
    assert dp.max_releases == 0 and dp.exhausted


def test_spent_budget_survives_a_checkpoint() -> None:
    spec = PrivacySpec(dp_epsilon=2.0, dp_total_epsilon=20.0)
    dp = LocalDP(spec, seed=0)
    x = torch.zeros(4)
    for _ in range(3):
        x = dp.sanitize(x, x + 1)
    restored = LocalDP(spec, seed=1)
    restored.load_state_dict(dp.state_dict())
    assert restored.releases == 3 and restored.spent() == dp.spent()
    with pytest.raises(ValueError, match="noise multiplier"):
        LocalDP(PrivacySpec(dp_epsilon=4.0), seed=0).load_state_dict(dp.state_dict())
    with pytest.raises(ValueError, match="releases"):
        restored.load_state_dict({"releases": torch.tensor(-1)})
