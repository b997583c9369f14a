"""Local differential privacy of shared updates: clip, add Gaussian noise, account for the spent budget.

Each round the update a peer shares (its model minus the model it started the round from) is clipped to L2 norm
``dp_clip_norm`` and Gaussian noise of standard deviation

    sigma = clip * sqrt(2 ln(1.25 / delta)) / epsilon

is added to every coordinate (the calibration of the gossip-DP tutorial). The node then continues from the noised
model, so everything it shares later is post-processing of noised releases and of what peers sent it.

Only trainable parameters are clipped and noised (``mask``); entries that do not train (frozen parameters) are
released as they were before training, so they too are post-processing. Models with floating-point buffers are
refused by the node under DP (Opacus does the same): BatchNorm's running statistics are computed from the data,
are not part of the gradient update this mechanism bounds, and noise of this scale drives a running variance
negative (NaN in evaluation).

Guarantee and its unit: one release per round of an update with L2 sensitivity ``clip`` under adding or removing
this peer's whole contribution (the DP-FedAvg user-level convention the tutorial follows; under "replace the
peer's data by any other" the sensitivity is twice as large). Releases are composed with the Renyi-DP accountant
of Google's ``dp-accounting`` (one GaussianDpEvent with noise multiplier sigma/clip per round), converted to
(epsilon, delta) at the manifest's ``dp_delta``. With ``dp_total_epsilon`` set, a release that would push the
cumulative epsilon past it is refused: ``exhausted`` tells the node to stop sharing.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch

from quinkgl_cli.manifest.schema import PrivacySpec


class BudgetExhausted(RuntimeError):
    """Another release would spend more than the manifest's total privacy budget."""


def gaussian_sigma(clip_norm: float, epsilon: float, delta: float) -> float:
    """The tutorial's calibration of the Gaussian mechanism for L2 sensitivity ``clip_norm``."""
    return clip_norm * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def clip_to_norm(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """``update`` scaled down to L2 norm at most ``clip_norm``; also returns the norm before clipping."""
    norm = float(torch.linalg.vector_norm(update.to(torch.float64)))
    scale = min(1.0, clip_norm / (norm + 1e-12))
    return (update * scale if scale < 1.0 else update.clone()), norm


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Cumulative epsilon of ``releases`` Gaussian releases, by the RDP accountant of ``dp-accounting``."""
    if releases == 0:
        return 0.0
    import dp_accounting  # slow to import (scipy): only DP swarms pay it
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


class LocalDP:
    """The per-node DP mechanism and its accountant. Inactive (every method a no-op) when ``dp_epsilon`` is unset."""

    def __init__(self, spec: PrivacySpec, seed: int | None = None) -> None:
        self.spec = spec
        self.enabled = spec.dp_epsilon is not None
        self.sigma = gaussian_sigma(spec.dp_clip_norm, spec.dp_epsilon, spec.dp_delta) if spec.dp_epsilon else 0.0
        self.noise_multiplier = self.sigma / spec.dp_clip_norm
        self.releases = 0
        self.last_norm: float | None = None  # of the last update before clipping
        self.last_clipped = False
        self._gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self._max_releases: int | None = None
        self._epsilon_cache: tuple[int, float] = (0, 0.0)

    # ------------------------------------------------------------------ mechanism
    def sanitize(self, start: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``start`` + clipped, noised (``trained`` - ``start``): the model to continue from and share.

        ``mask`` (bool, like ``start``) limits the update to the entries that train; the others come back as in
        ``start``. Counts one release; raises BudgetExhausted (and releases nothing) when the budget cannot afford it.
        """
        if not self.enabled:
            return trained
        if self.exhausted:
            raise BudgetExhausted(f"privacy budget spent: {self.releases} releases reach epsilon {self.spent()[0]:.3f}")
        update = trained - start
        if mask is not None:
            update = update * mask
        clipped, norm = clip_to_norm(update, self.spec.dp_clip_norm)
        noise = torch.normal(0.0, self.sigma, size=clipped.shape, generator=self._gen, dtype=clipped.dtype)
        if mask is not None:
            noise.mul_(mask)
        self.last_norm = norm
        self.last_clipped = norm > self.spec.dp_clip_norm
        self.releases += 1
        return start + clipped + noise

    # ------------------------------------------------------------------ accountant
    def spent(self) -> tuple[float, float]:
        """Cumulative (epsilon, delta) of the releases so far."""
        if not self.enabled:
            return 0.0, 0.0
        if self._epsilon_cache[0] != self.releases:
            self._epsilon_cache = (self.releases, rdp_epsilon(self.noise_multiplier, self.releases, self.spec.dp_delta))
        return self._epsilon_cache[1], self.spec.dp_delta

    @property
    def max_releases(self) -> int | None:
        """How many rounds the total budget affords (None: no total budget)."""
        total = self.spec.dp_total_epsilon
        if not self.enabled or total is None:
            return None
        if self._max_releases is None:
            def fits(r: int) -> bool:
                return rdp_epsilon(self.noise_multiplier, r, self.spec.dp_delta) <= total

            lo, hi = 0, 1
            while fits(hi):  # epsilon grows without bound in r, so this ends
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            self._max_releases = lo
        return self._max_releases

    @property
    def exhausted(self) -> bool:
        """True when another release would exceed ``dp_total_epsilon``: the node must stop sharing."""
        limit = self.max_releases
        return limit is not None and self.releases >= limit

    def metrics(self) -> dict[str, Any]:
        """Round metrics for logs and ``on_round_end`` (empty when DP is off)."""
        if not self.enabled:
            return {}
        eps, delta = self.spent()
        out: dict[str, Any] = {"dp_epsilon_spent": round(eps, 6), "dp_delta": delta, "dp_releases": self.releases,
                               "dp_clipped": self.last_clipped}
        if self.spec.dp_total_epsilon is not None:
            out["dp_epsilon_total"] = self.spec.dp_total_epsilon
            out["dp_exhausted"] = self.exhausted
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The release count and its noise level: a restarted daemon must not get its budget back."""
        return {"releases": torch.tensor(self.releases, dtype=torch.int64),
                "noise_multiplier": torch.tensor(self.noise_multiplier, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        t, z = state.get("releases"), state.get("noise_multiplier")
        if t is None or z is None or set(state) != {"releases", "noise_multiplier"} or t.dtype != torch.int64 \
                or t.numel() != 1 or int(t) < 0 or z.dtype != torch.float64 or z.numel() != 1:
            raise ValueError("privacy state must hold an int64 'releases' count and a float64 'noise_multiplier'")
        if int(t) and not math.isclose(float(z), self.noise_multiplier, rel_tol=1e-12):
            raise ValueError(f"checkpoint's releases used noise multiplier {float(z):.6g}, the manifest now gives "
                             f"{self.noise_multiplier:.6g}: the spent budget cannot be carried over")
        self.releases = int(t)
