"""Aggregation strategies over flat float32 model vectors.

Every aggregator validates what it receives first (wrong length, non-finite values, bad sample counts, duplicate
or self-echoed peer ids are listed in ``AggregationResult.rejected``), then combines the survivors in one
vectorized pass: updates are stacked once and weights applied with a single matrix product, so cost does not grow
with the number of parameter tensors. None of them raises for too few updates: the robust ones fall back to the
most robust rule the count allows and say so in ``AggregationResult.note``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quinkgl_cli.strategies import params as p
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, PeerUpdate

log = logging.getLogger("quinkgl.strategies")

# Scaffold ships its control variate under this extras key.
CONTROL_VARIATE_KEY = "scaffold_c"
# Peers attach their label entropy (bits, from the quantized fingerprint buckets) under this meta key.
LABEL_ENTROPY_KEY = "label_entropy"
# An entropy claim above this many bits (2^16 equally likely classes) is not a label distribution.
_MAX_ENTROPY_BITS = 16.0


@dataclass
class _Screened:
    """Updates that passed validation, local first when it survived."""

    updates: list[PeerUpdate]
    rejected: list[str]
    reasons: list[str]

    @property
    def ids(self) -> list[str]:
        return [u.peer_id for u in self.updates]

    def note(self, extra: str = "") -> str:
        parts = [extra] if extra else []
        if self.reasons:
            parts.append("rejected " + ", ".join(self.reasons))
        return "; ".join(parts)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def screen(local: PeerUpdate, others: Sequence[PeerUpdate]) -> _Screened:
    """Drop updates that cannot be combined with the local model; say why for each."""
    expected = local.flat.numel()
    kept: list[PeerUpdate] = []
    rejected: list[str] = []
    reasons: list[str] = []
    seen: set[str] = set()

    def drop(update: PeerUpdate, why: str) -> None:
        rejected.append(update.peer_id)
        reasons.append(f"{update.peer_id}:{why}")

    for update in (local, *others):
        if update.peer_id in seen:
            drop(update, "duplicate")
            continue
        seen.add(update.peer_id)
        if update.flat.dim() != 1 or update.flat.numel() != expected:
            drop(update, f"length {update.flat.numel()}!={expected}")
        elif not update.flat.is_floating_point():
            drop(update, f"dtype {update.flat.dtype}")
        elif update.sample_count < 0:
            drop(update, f"sample_count {update.sample_count}")
        elif not _finite(update.flat):
            drop(update, "non-finite")
        else:
            kept.append(update)
    return _Screened(kept, rejected, reasons)


def stack(updates: Sequence[PeerUpdate]) -> torch.Tensor:
    """One (n, d) float32 matrix of the updates (a single copy)."""
    return torch.stack([u.flat.to(torch.float32) for u in updates])


def weighted_mean(updates: Sequence[PeerUpdate], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i for normalized ``weights``, as one accumulation per update (no (n, d) copy)."""
    w = weights.to(torch.float64)
    w = w / w.sum()
    out = updates[0].flat.to(torch.float32).mul(float(w[0]))
    for u, wi in zip(updates[1:], w[1:].tolist(), strict=True):
        out.add_(u.flat, alpha=wi)
    return out


def bounded_weights(raw: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Normalize ``raw`` so that no weight exceeds ``max_ratio`` times the mean weight (1/n).

    Water-filling: capped weights sit exactly at the cap and the excess goes to the others in proportion to their
    raw weights, so a peer claiming 2^32 samples gets at most ``max_ratio / n`` of the result.
    """
    n = raw.numel()
    w = raw.to(torch.float64).clamp(min=0.0)
    if n == 0:
        return w
    if float(w.sum()) <= 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    cap = max_ratio / n
    if cap >= 1.0:
        return w / w.sum()
    capped = torch.zeros(n, dtype=torch.bool)
    out = w / w.sum()
    for _ in range(n):
        over = (out > cap + 1e-15) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        free = ~capped
        budget = 1.0 - cap * int(capped.sum())
        free_total = float(w[free].sum())
        out = torch.where(capped, torch.full_like(out, cap), out)
        if free_total > 0.0:
            out[free] = w[free] / free_total * budget
        else:
            out[free] = budget / max(int(free.sum()), 1)
    return out


def _apply_self_weight(weights: torch.Tensor, updates: Sequence[PeerUpdate], self_weight: float | None) -> torch.Tensor:
    """Give the local model a fixed share when asked; others keep their relative (bounded) weights."""
    if self_weight is None or not updates or not updates[0].is_local or len(updates) == 1:
        return weights
    rest = weights[1:]
    total = float(rest.sum())
    out = torch.empty_like(weights)
    out[0] = self_weight
    out[1:] = rest / total * (1.0 - self_weight) if total > 0 else (1.0 - self_weight) / rest.numel()
    return out


def sample_weights(updates: Sequence[PeerUpdate], params: p.FedAvgParams) -> torch.Tensor:
    """FedAvg weights: sample counts (a count of 0 counts as 1), bounded, then the local share if configured."""
    counts = torch.tensor([max(u.sample_count, 1) for u in updates], dtype=torch.float64)
    return _apply_self_weight(bounded_weights(counts, params.max_weight_ratio), updates, params.self_weight)


def _nothing_usable(local: PeerUpdate, s: _Screened) -> AggregationResult:
    return AggregationResult(local.flat.clone(), used=[], rejected=s.rejected, note=s.note("no usable update, kept local model"))


class FedAvg(Aggregator):
    """Sample-weighted average (McMahan et al.) with weights bounded by ``max_weight_ratio``."""

    name = "FedAvg"
    params: p.FedAvgParams

    def weights(self, updates: Sequence[PeerUpdate], current_round: int) -> torch.Tensor:
        return sample_weights(updates, self.params)

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        w = self.weights(s.updates, current_round)
        return AggregationResult(weighted_mean(s.updates, w), used=s.ids, rejected=s.rejected, note=s.note())
