"""Aggregation strategies over flat float32 model vectors.

Every aggregator validates what it receives first (wrong length, non-finite values, bad sample counts, duplicate
or self-echoed peer ids are listed in ``AggregationResult.rejected``), refuses models far smaller in norm than the
round's (`norm_floor`: an untrained or zeroed model), refuses models pointing away from the local one
(`OPPOSED_COS`: a sign flip), scales models far larger in norm down (`norm_reference`: a boosted model), bounds
poisoned updates (`bound_outliers`: an update too far from the local model is refused, one far beyond the round's
typical distance is clipped), then combines the survivors in one
vectorized pass over whole flat vectors (weighted sums accumulate one update at a time, Krum's distances come from
one Gram matrix product, median and trimmed mean sort cache-sized column blocks with a vectorized sorting
network), so cost does not grow with the number of parameter tensors. None of them raises for too few updates: the robust ones fall back to the
most robust rule the count allows and say so in ``AggregationResult.note``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from quinkgl_cli.events import emit
from quinkgl_cli.manifest import strategy_params as p
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, PeerUpdate
from quinkgl_cli.strategies.momentum import hold_still
from quinkgl_cli.tensors import flatten, still_mask

# Scaffold ships its control variate under this extras key.
CONTROL_VARIATE_KEY = "scaffold_c"
# Peers attach their label entropy (bits, from the quantized fingerprint buckets) under this meta key.
LABEL_ENTROPY_KEY = "label_entropy"
# An entropy claim above this many bits (2^16 equally likely classes) is not a label distribution.
_MAX_ENTROPY_BITS = 16.0

log = logging.getLogger("quinkgl.strategies")

# Poison bounds, in units of the reference scale: the norm of the local model (or of MIN_RMS per coordinate when
# that is larger, so a model near zero still accepts honest updates). Honest peers of one swarm differ by about
# one model norm at most (two random initialisations are sqrt(2) norms apart), so REFUSE_RATIO norms is far
# outside the honest range; such an update can only be poison, and averaging it in can overflow the next
# training step. Inside that range, a distance above CLIP_RATIO times the round's (lower) median distance, and
# above CLIP_FLOOR norms, is scaled back to that limit: it keeps its direction but not its leverage.
REFUSE_RATIO = 100.0
CLIP_RATIO = 4.0
CLIP_FLOOR = 1.0
MIN_RMS = 0.1
# A model whose norm lies far below the round's (the median over the local model and the updates) did not train with
# the swarm: an untrained initialisation sent as a contribution, a zeroed or shrunken copy. The distance bounds
# cannot see it: it lies about one model norm from every model, as far as an honest peer after a local epoch of a
# small network (the digits MLP: honest peers 0.7-0.9 norms apart, a fresh initialisation 0.75), yet every average
# it joins is pulled toward zero or noise. Honest models of one round start from the previous averages and differ
# little in norm (bench_learning's four families on its three splits: the smallest was 0.75 of the median), so
# "far below" is both under the median / SHRINK_RATIO and more than SHRINK_SPREAD median absolute deviations under
# the median (a swarm whose models legitimately spread in norm, near zero or at different stages, refuses
# nothing). It needs three norms, the local model's and two updates', so that one update cannot set the median.
SHRINK_RATIO = 1.5
SHRINK_SPREAD = 4.0
# A model pointing away from the local one (cosine similarity below OPPOSED_COS) did not come from this swarm's
# training: honest models share their initial weights and each round's averages. Their cosine with the local model
# was 0.41 at the lowest (0.9 in the median) over four model families and two splits, and -0.17 at the lowest in
# tiny models with one class per peer (tests/test_learning.py), whose training outweighs the shared start; a
# sign-flipped model lay at -0.5 to -0.94. Noise (cosine ~0) cannot be told from that tiny-model case by direction
# and is left to the distance bounds. The distance bounds cannot see a sign flip: on label-skewed splits honest
# models lie up to a model norm apart, and a flipped model clipped to that limit still pulls toward zero.
# Refused only while another model of the round is aligned with the local one (ALIGNED_COS): a peer whose own
# model is the odd one out (it started from other weights, or from zero and trained on other classes) joins its
# partners instead of refusing them all.
OPPOSED_COS = -0.3
ALIGNED_COS = 0.5
# Noise has no direction to give away, but it is far larger than any honest model (N(0, 1) weights: about ten
# times the digits MLP's norm, while honest norms of a round stay within 0.75-1.33 of its median): a model at least
# GROW_RATIO times the round's median norm (three norms at least) that is not aligned with the local one either
# (cosine below UNALIGNED_COS) is refused under the same condition. A boosted copy of an honest model (weights
# x100) keeps its direction and is left to the distance bounds.
GROW_RATIO = 3.0
UNALIGNED_COS = 0.2
# A model that keeps its direction but not its size (an honest model boosted x100) passes the direction check, and
# the distance clip leaves it a model norm of pull (its floor, CLIP_FLOOR: honest models lie that far apart), so a
# clipped x100 model still doubles a partner's model, every round, and the inflated partners then pass it on. A
# remote model at least GROW_RATIO times the reference norm is scaled down to that norm, keeping its direction: the
# reference is the larger of the local model's norm and the round's lower median norm (three norms at least, as for
# the norm floor), so a peer whose own model is still small (a late joiner, a zero initialisation) keeps its
# partners' trained models whole. Honest norms of a round stay within 0.75-1.33 of its median: none was scaled.


@dataclass
class _Screened:
    """Updates that passed validation (clipped ones in their clipped form), local first when it survived."""

    updates: list[PeerUpdate]
    rejected: list[str]
    reasons: list[str]
    clipped: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [u.peer_id for u in self.updates]

    def note(self, extra: str = "") -> str:
        parts = [extra] if extra else []
        if self.reasons:
            parts.append("rejected " + ", ".join(self.reasons))
        if self.clipped:
            parts.append("clipped " + ", ".join(self.clipped))
        return "; ".join(parts)


def _finite(t: torch.Tensor) -> bool:
    """All values finite. A sum is NaN or infinite whenever any term is, so one cheap reduction settles the
    common case; only a non-finite sum (or an overflow of huge finite values) pays for the exact check."""
    if t.numel() == 0:
        return True
    if math.isfinite(t.sum(dtype=torch.float32 if t.dtype != torch.float64 else torch.float64).item()):
        return True
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
    screened = _Screened(kept, rejected, reasons)
    if kept and kept[0].is_local:
        norms = {id(u): _norm(u.flat) for u in kept}  # one pass each, for both norm-based screens
        _refuse_shrunken(screened, norms)
        _refuse_opposed(screened, norms)
        _cap_norms(screened, norms)
        _bound_updates(screened)
    return screened


def norm_floor(norms: Sequence[float]) -> float:
    """The norm below which a model is far outside the round's ``norms`` (see SHRINK_RATIO); -inf with fewer than
    three."""
    if len(norms) < 3:
        return -math.inf
    median = sorted(norms)[len(norms) // 2]
    spread = sorted(abs(n - median) for n in norms)[len(norms) // 2]
    return min(median / SHRINK_RATIO, median - SHRINK_SPREAD * spread)


def _refuse_shrunken(s: _Screened, norm_of: dict[int, float]) -> None:
    """Refuse the remote updates of ``s`` whose norm (``norm_of``, by update id) is far below the round's (see
    SHRINK_RATIO), logging each."""
    norms = [norm_of[id(u)] for u in s.updates]
    floor = norm_floor(norms)
    if min(norms[1:], default=math.inf) >= floor:
        return
    _refuse_below(s, norms[1:], "norm", floor)


def _refuse_below(s: _Screened, values: Sequence[float | None], measure: str, limit: float) -> None:
    """Refuse, and log, each remote update of ``s`` whose ``measure`` (``values``, one per remote update; None:
    not judged) lies below ``limit``."""
    kept = [s.updates[0]]
    for update, value in zip(s.updates[1:], values, strict=True):
        if value is None or value >= limit:
            kept.append(update)
            continue
        s.rejected.append(update.peer_id)
        s.reasons.append(f"{update.peer_id}:{measure} {value:.3g}<{limit:.3g}")
        fields: dict[str, Any] = {measure: value, "limit": limit}  # the line reads norm=... or cosine=...
        emit(log, logging.WARNING, "update-refused", peer=update.peer_id, **fields)
    s.updates = kept


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def cosine(a: torch.Tensor, b: torch.Tensor, norm_a: float | None = None, norm_b: float | None = None) -> float:
    """Cosine similarity (norms given when known); 0 when either vector is zero. The float32 dot product is summed
    again in float64 when it overflows (poison of huge values)."""
    na = _norm(a) if norm_a is None else norm_a
    nb = _norm(b) if norm_b is None else norm_b
    if na == 0.0 or nb == 0.0:
        return 0.0
    dot = float(torch.dot(a, b)) if a.dtype == b.dtype else math.inf
    if not math.isfinite(dot):
        dot = float(torch.dot(a.to(torch.float64), b.to(torch.float64)))
    return dot / (na * nb)


def _refuse_opposed(s: _Screened, norm_of: dict[int, float]) -> None:
    """Refuse the remote updates of ``s`` that point away from the local model, or are huge and unaligned with it,
    when another is aligned with it (see OPPOSED_COS and GROW_RATIO), logging each. Updates too far for any
    direction to matter are left to the distance bound. ``norm_of``: each update's norm, by id."""
    local, remote = s.updates[0], s.updates[1:]
    local_norm = norm_of[id(local)]
    far = _refusal_norm(local.flat, local_norm)
    norms = [norm_of[id(u)] for u in remote]
    cosines = [cosine(local.flat, u.flat, local_norm, n) if n <= far else None for u, n in zip(remote, norms, strict=True)]
    known = [c for c in cosines if c is not None]
    if not known or max(known) < ALIGNED_COS:
        return
    if min(known) < OPPOSED_COS:
        _refuse_below(s, cosines, "cosine", OPPOSED_COS)
    every = sorted([local_norm, *norms])
    if len(every) < 3:
        return
    huge = GROW_RATIO * every[len(every) // 2]
    cosine_of = {id(u): c for u, c in zip(remote, cosines, strict=True)}
    kept = [s.updates[0]]
    for update in s.updates[1:]:
        cos, norm = cosine_of[id(update)], norm_of[id(update)]
        if cos is None or cos >= UNALIGNED_COS or norm < huge:
            kept.append(update)
            continue
        s.rejected.append(update.peer_id)
        s.reasons.append(f"{update.peer_id}:norm {norm:.3g}>={huge:.3g} cosine {cos:.3g}<{UNALIGNED_COS:g}")
        emit(log, logging.WARNING, "update-refused", peer=update.peer_id, norm=norm, limit=huge, cosine=cos)
    s.updates = kept


def norm_reference(norms: Sequence[float]) -> float:
    """The norm a round's remote models are capped against (see GROW_RATIO): the larger of the local model's norm
    (``norms[0]``) and the round's lower median norm; infinite with fewer than three norms, where nothing tells
    a boosted remote model from a local one that is still small."""
    if len(norms) < 3:
        return math.inf
    return max(norms[0], sorted(norms)[(len(norms) - 1) // 2])


def _refusal_norm(local: torch.Tensor, local_norm: float) -> float:
    """The norm beyond which a model lies farther from ``local`` than the distance refusal allows, whatever its
    direction: such models are left to that refusal."""
    return REFUSE_RATIO * max(local_norm, MIN_RMS * math.sqrt(local.numel())) + local_norm


def _cap_norms(s: _Screened, norm_of: dict[int, float]) -> None:
    """Scale each remote update of ``s`` at least GROW_RATIO times the reference norm down to it, logging each;
    updates too far for any scaling to matter are left to the distance refusal."""
    norms = [norm_of[id(u)] for u in s.updates]
    reference = norm_reference(norms)
    limit = GROW_RATIO * reference
    if reference <= 0.0 or max(norms[1:], default=0.0) < limit:
        return
    far = _refusal_norm(s.updates[0].flat, norms[0])
    kept = [s.updates[0]]
    for update, norm in zip(s.updates[1:], norms[1:], strict=True):
        if norm < limit or norm > far:
            kept.append(update)
            continue
        s.clipped.append(f"{update.peer_id}:norm {norm:.3g}>={limit:.3g}")
        emit(log, logging.WARNING, "update-scaled", peer=update.peer_id, norm=norm, limit=limit, to=reference)
        kept.append(replace(update, flat=update.flat * (reference / norm)))
    s.updates = kept


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Euclidean distance. The fused float32 kernel is 5x faster; when its sum of squares overflows (distances
    above ~1e19, poison) the difference is summed again in float64 so the logged number is still right."""
    fast = float(torch.dist(a, b))
    if math.isfinite(fast):
        return fast
    return float(torch.linalg.vector_norm(torch.sub(a, b), dtype=torch.float64))


@dataclass(frozen=True)
class Bounds:
    """Distance limits from one reference vector for one round: refuse beyond ``refuse``, clip beyond ``clip``."""

    scale: float
    refuse: float
    clip: float


def bound_limits(reference: torch.Tensor, distances: Sequence[float]) -> Bounds:
    """The limits for updates at ``distances`` from ``reference`` (see REFUSE_RATIO and CLIP_RATIO).

    The clip limit comes from the lower median of the distances that are not refused, so it needs two of them
    and an attacker that is one of two cannot set it; with fewer there is nothing to compare with and only the
    refusal applies."""
    scale = max(float(torch.linalg.vector_norm(reference, dtype=torch.float64)), MIN_RMS * math.sqrt(reference.numel()))
    refuse = REFUSE_RATIO * scale
    inside = sorted(d for d in distances if d <= refuse)
    clip = max(CLIP_RATIO * inside[(len(inside) - 1) // 2], CLIP_FLOOR * scale) if len(inside) >= 2 else math.inf
    return Bounds(scale, refuse, clip)


def bound_outliers(reference: torch.Tensor, vectors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor | None, float, Bounds]]:
    """Each vector refused (None), clipped toward ``reference`` to the clip limit, or kept as it is; with its
    distance from the reference and the round's limits."""
    distances = [distance(v, reference) for v in vectors]
    bounds = bound_limits(reference, distances)
    out: list[tuple[torch.Tensor | None, float, Bounds]] = []
    for v, dist in zip(vectors, distances, strict=True):
        if not dist <= bounds.refuse:  # also catches an infinite distance (values near the float32 limit)
            out.append((None, dist, bounds))
        elif dist > bounds.clip:
            ref = reference.to(torch.float32)
            out.append((torch.sub(v, ref).mul_(bounds.clip / dist).add_(ref), dist, bounds))
        else:
            out.append((v, dist, bounds))
    return out


def _bound_updates(s: _Screened) -> None:
    """Refuse or clip the remote updates of ``s`` against the local model (``s.updates[0]``), logging each."""
    local, remote = s.updates[0], s.updates[1:]
    if not remote:
        return
    kept = [local]
    for update, (flat, dist, bounds) in zip(remote, bound_outliers(local.flat, [u.flat for u in remote]), strict=True):
        if flat is None:
            s.rejected.append(update.peer_id)
            s.reasons.append(f"{update.peer_id}:distance {dist:.3g}>{bounds.refuse:.3g}")
            emit(log, logging.WARNING, "update-refused", peer=update.peer_id, distance=dist, limit=bounds.refuse,
                 scale=bounds.scale)
        elif flat is not update.flat:
            s.clipped.append(f"{update.peer_id}:distance {dist:.3g}>{bounds.clip:.3g}")
            emit(log, logging.WARNING, "update-clipped", peer=update.peer_id, distance=dist, limit=bounds.clip,
                 scale=bounds.scale)
            kept.append(replace(update, flat=flat))
        else:
            kept.append(update)
    s.updates = kept


def weighted_mean(updates: Sequence[PeerUpdate], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i for normalized ``weights``, as one accumulation per update (no (n, d) copy)."""
    w = weights.to(torch.float64)
    return weighted_mean_rows([u.flat for u in updates], (w / w.sum()).tolist())


def share_cap(n: int, max_ratio: float) -> float:
    """The largest share one of ``n`` updates may hold: min(max_ratio / n, max_ratio / (1 + max_ratio)).

    Sample counts (and entropy claims) are self-reported: they may move weight between updates, but only so far.
    max_ratio / n is max_ratio times the mean share, the bound that matters in a crowd. It is void once
    n <= max_ratio (at n = 2 with the default 2 it allows the whole result, so a peer claiming 2^31 samples would
    replace the local model), because the liar's own share is part of the mean. max_ratio / (1 + max_ratio) says
    the same thing against a reference the liar does not inflate: no update may weigh more than max_ratio times all
    the others together. So however few updates arrive, the rest of the round (the node's own model at least)
    keeps 1 / (1 + max_ratio) of the result: a third at n = 2 with the default, half with max_ratio = 1.
    Weights inside both bounds are untouched, so FedAvg stays exactly sample-weighted for honest, similar counts.
    """
    if n <= 1:
        return 1.0
    return min(max_ratio / n, max_ratio / (1.0 + max_ratio))


def bounded_weights(raw: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Normalize ``raw`` so that no weight exceeds ``share_cap(n, max_ratio)``.

    Water-filling: capped weights sit exactly at the cap and the excess goes to the others in proportion to their
    raw weights, so a peer claiming 2^32 samples gets at most the cap of the result.
    """
    n = raw.numel()
    w = raw.to(torch.float64).clamp(min=0.0)
    if n == 0:
        return w
    if float(w.sum()) <= 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    cap = share_cap(n, max_ratio)
    if cap >= 1.0:
        return w / w.sum()
    out = w / w.sum()
    if float(out.max()) <= cap + 1e-15:  # the common case: no weight over the cap (a NaN goes the long way)
        return out
    capped = torch.zeros(n, dtype=torch.bool)
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
        return AggregationResult(weighted_mean(s.updates, w), used=s.ids, rejected=s.rejected, note=s.note(),
                                 combined=s.updates)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def _flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.empty(0)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in params])


class FedProx(FedAvg):
    """FedAvg plus the proximal term mu/2 ||w - w_global||^2 in the local loss (Li et al.).

    The anchor is the model as aggregated when local training begins, so the term pulls local steps back toward
    it and changes every gradient the optimizer sees.
    """

    name = "FedProx"
    params: p.FedProxParams

    def __init__(self, params: p.Params, byzantine_f: int = 0) -> None:
        super().__init__(params, byzantine_f)
        self._anchor: list[torch.Tensor] = []

    def begin_training(self, model: nn.Module, lr: float) -> None:
        self._anchor = [param.detach().clone() for param in _trainable(model)]

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        params = _trainable(model)
        if self.params.mu == 0.0 or not self._anchor or len(params) != len(self._anchor):
            return None
        total = torch.stack([(param - anchor).pow(2).sum() for param, anchor in zip(params, self._anchor, strict=True)]).sum()
        return 0.5 * self.params.mu * total

    def end_training(self, model: nn.Module, steps: int, lr: float) -> None:
        self._anchor = []


class FedAvgM(FedAvg):
    """FedAvg with momentum on the aggregated delta (Hsu et al.), gossip form.

    delta = FedAvg(updates) - reference, where the reference is the model this node held before the round's local
    training (or, between gossip steps, the previous aggregation's result); v = beta v + delta; the new model is
    reference + server_lr * v. With beta = 0 and server_lr = 1 this is exactly plain averaging (the manifest's
    ``FedAvg`` gets the node's default slow momentum, `strategies.momentum`). The end-of-run merge averages only.
    """

    name = "FedAvgM"
    params: p.FedAvgMParams

    def __init__(self, params: p.Params, byzantine_f: int = 0) -> None:
        super().__init__(params, byzantine_f)
        self._momentum: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        self._still: torch.Tensor | None = None
        self._merging = False

    def begin_training(self, model: nn.Module, lr: float) -> None:
        self._reference = flatten(model)
        self._still = still_mask(model)

    def begin_consensus(self) -> None:
        # A velocity carried into the merge would move every peer the same way several times over (measured:
        # shards:2 logistic regression 88% before the merge, 76% after it).
        self._merging = True
        self._momentum = None

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        result = super().aggregate(local, others, current_round)
        if not result.used or self._merging:
            return result
        ref = self._reference
        if ref is None or ref.numel() != result.flat.numel():
            ref = local.flat.to(torch.float32)
        delta = result.flat - ref
        if self._momentum is None or self._momentum.numel() != delta.numel():
            self._momentum = torch.zeros_like(delta)
        self._momentum.mul_(self.params.server_momentum).add_(delta)
        new = ref + self.params.server_lr * self._momentum
        hold_still(new, result.flat, self._momentum, self._still)  # as slow momentum does: `strategies.momentum`
        self._reference = new.clone()
        return AggregationResult(new, used=result.used, rejected=result.rejected, note=result.note,
                                 combined=result.combined)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._momentum is None else {"momentum": self._momentum.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = set(state) - {"momentum"}
        if unknown:
            raise ValueError(f"FedAvgM state has unknown entries {sorted(unknown)}")
        momentum = state.get("momentum")
        if momentum is not None and not _finite(momentum):
            raise ValueError("FedAvgM momentum in the checkpoint is not finite")
        self._momentum = None if momentum is None else momentum.to(torch.float32).clone()


class StalenessWeightedFedAvg(FedAvg):
    """FedAvg whose weights are multiplied by exp(-decay * age), age = current_round - update.round (>= 0)."""

    name = "StalenessWeightedFedAvg"
    params: p.StalenessWeightedParams

    def weights(self, updates: Sequence[PeerUpdate], current_round: int) -> torch.Tensor:
        counts = torch.tensor([max(u.sample_count, 1) for u in updates], dtype=torch.float64)
        base = bounded_weights(counts, self.params.max_weight_ratio)
        ages = torch.tensor([max(current_round - u.round, 0) for u in updates], dtype=torch.float64)
        w = base * torch.exp(-self.params.decay * ages)
        return _apply_self_weight(w / w.sum(), updates, self.params.self_weight)


def _entropy_claim(update: PeerUpdate) -> float | None:
    value = update.meta.get(LABEL_ENTROPY_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0.0 or value > _MAX_ENTROPY_BITS:
        return None
    return value


class EntropyWeightedAvg(FedAvg):
    """Weights by the Shannon entropy (bits) of each peer's label distribution (RNEP, Kang & Lee).

    Peers attach ``meta["label_entropy"]`` (see ``fingerprint.label_entropy``: computed from the quantized label
    buckets, so it reveals nothing the fingerprint does not). Weight = max(entropy, entropy_floor); an update
    without a valid claim gets ``fallback_weight``, and the note names those peers so a swarm silently running on
    fallback weights is visible. Weights are bounded by ``max_weight_ratio`` like FedAvg's.
    """

    name = "EntropyWeightedAvg"
    params: p.EntropyWeightedAvgParams

    def _raw(self, updates: Sequence[PeerUpdate]) -> tuple[torch.Tensor, list[str]]:
        raw: list[float] = []
        missing: list[str] = []
        for u in updates:
            h = _entropy_claim(u)
            if h is None:
                missing.append(u.peer_id)
                raw.append(self.params.fallback_weight)
            else:
                raw.append(max(h, self.params.entropy_floor))
        return torch.tensor(raw, dtype=torch.float64), missing

    def weights(self, updates: Sequence[PeerUpdate], current_round: int) -> torch.Tensor:
        raw, _ = self._raw(updates)
        return _apply_self_weight(bounded_weights(raw, self.params.max_weight_ratio), updates, self.params.self_weight)

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        raw, missing = self._raw(s.updates)
        w = _apply_self_weight(bounded_weights(raw, self.params.max_weight_ratio), s.updates, self.params.self_weight)
        extra = f"no label_entropy from {','.join(missing)}: fallback_weight" if missing else ""
        return AggregationResult(weighted_mean(s.updates, w), used=s.ids, rejected=s.rejected, note=s.note(extra),
                                 combined=s.updates)


# ----------------------------------------------------------------------------------------------------------------
# Byzantine-robust rules


_NETWORK_MAX_ROWS = 64  # beyond this many updates a sorting network has too many comparators: use torch.sort
_CHUNK = 1 << 17  # columns per block: n rows of this many floats stay in cache while they are sorted


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort comparators for n inputs (padded to a power of two, padding pairs dropped:
    padding acts as +inf, so a comparator touching it never swaps)."""
    pairs: list[tuple[int, int]] = []
    size = 1
    while size < n:
        size *= 2

    def merge(lo: int, hi: int, r: int) -> None:
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi - lo >= 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, size - 1)
    return [(i, j) for i, j in pairs if j < n]


def _sorted_blocks(rows: Sequence[torch.Tensor]) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Yield (start, stop, sorted_rows) per block of columns: sorted_rows[i] holds the i-th smallest value of every
    coordinate in the block. Small counts run a vectorized sorting network on cache-sized blocks (a plain
    torch.sort along the update axis is ~10x slower); larger counts sort each block."""
    n = len(rows)
    d = rows[0].numel()
    network = _sorting_network(n) if n <= _NETWORK_MAX_ROWS else None
    spare = torch.empty(min(_CHUNK, d))
    for start in range(0, d, _CHUNK):
        stop = min(start + _CHUNK, d)
        if network is None:
            block = torch.stack([r[start:stop].to(torch.float32) for r in rows]).sort(dim=0).values
            yield start, stop, list(block)
            continue
        block_rows = [r[start:stop].to(torch.float32, copy=True) for r in rows]
        buf = spare[: stop - start]
        for i, j in network:
            torch.minimum(block_rows[i], block_rows[j], out=buf)
            torch.maximum(block_rows[i], block_rows[j], out=block_rows[j])
            block_rows[i], buf = buf, block_rows[i]
        spare = buf if buf.numel() == spare.numel() else spare
        yield start, stop, block_rows


def coordinate_median(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median of equally long vectors; the mean of the two middle values for an even count."""
    n = len(rows)
    out = torch.empty(rows[0].numel())
    for start, stop, s in _sorted_blocks(rows):
        if n % 2:
            out[start:stop] = s[n // 2]
        else:
            torch.add(s[n // 2 - 1], s[n // 2], out=out[start:stop]).mul_(0.5)
    return out


def trimmed_mean(rows: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the k largest and k smallest values of every coordinate."""
    n = len(rows)
    if 2 * k >= n:
        raise ValueError(f"cannot trim {k} per side from {n} updates")
    if k == 0:
        return weighted_mean_rows(rows)
    out = torch.empty(rows[0].numel())
    for start, stop, s in _sorted_blocks(rows):
        target = out[start:stop]
        target.copy_(s[k])
        for row in s[k + 1 : n - k]:
            target.add_(row)
        target.div_(n - 2 * k)
    return out


def weighted_mean_rows(rows: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """sum_i w_i x_i (uniform weights when none are given), one accumulation per row, no (n, d) copy."""
    w = [1.0 / len(rows)] * len(rows) if weights is None else list(weights)
    out = rows[0].to(torch.float32).mul(w[0])
    for row, wi in zip(rows[1:], w[1:], strict=True):
        out.add_(row, alpha=wi)
    return out


def centred_stack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, d) matrix of rows minus the first row, written in one pass per row."""
    ref = rows[0].to(torch.float32)
    x = torch.empty(len(rows), ref.numel())
    for i, row in enumerate(rows):
        torch.sub(row, ref, out=x[i])
    return x


def pairwise_sq_distances(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, n) squared Euclidean distances between the rows, from one Gram matrix product.

    Rows are centred on the first one first, so the Gram entries are on the scale of the spread between models
    rather than of their norms (no catastrophic cancellation when models are close).
    """
    x = centred_stack(rows)
    gram = (x @ x.T).to(torch.float64)
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Blanchard et al.'s score: sum of squared distances to the n - f - 2 nearest other updates."""
    n = dist.shape[0]
    nearest = n - f - 2
    d = dist.clone()
    d.fill_diagonal_(math.inf)
    return torch.topk(d, nearest, dim=1, largest=False).values.sum(dim=1)


class _Robust(Aggregator):
    """Shared screening and fallbacks of the Byzantine-robust rules."""

    def tolerated_f(self) -> int:
        f = getattr(self.params, "f", None)
        return self.byzantine_f if f is None else f

    def fallback(self, s: _Screened, f: int, why: str) -> AggregationResult:
        """The most robust rule ``len(s.updates)`` updates allow, with the reason in the note.

        Median tolerates floor((n-1)/2) attackers, the most any rule can; with two updates and f >= 1 no rule can
        tell which one lies, so the node keeps its own model (it knows that one is honest).
        """
        n = len(s.updates)
        ids = s.ids
        if n >= 3:
            tolerated = (n - 1) // 2
            extra = f"fell back to Median: {why}"
            if tolerated < f:
                extra += f"; Median tolerates only {tolerated} of f={f}"
            flat = coordinate_median([u.flat for u in s.updates])
            return AggregationResult(flat, used=ids, rejected=s.rejected, note=s.note(extra))
        if f == 0 or not s.updates[0].is_local:
            flat = weighted_mean_rows([u.flat for u in s.updates])
            return AggregationResult(flat, used=ids, rejected=s.rejected, note=s.note(f"fell back to mean: {why}"))
        local = s.updates[0]
        note = s.note(f"kept local model: {why}; {n} updates cannot outvote f={f}")
        return AggregationResult(local.flat.to(torch.float32).clone(), used=[local.peer_id], rejected=s.rejected, note=note)


class Krum(_Robust):
    """Krum (Blanchard et al., 2017): adopt the update with the smallest sum of squared distances to its n-f-2
    nearest neighbours. Needs n > 2f + 2 updates (the local model counts); below that, falls back."""

    name = "Krum"
    params: p.KrumParams

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        f = self.tolerated_f()
        n = len(s.updates)
        if n < 2 * f + 3:
            return self.fallback(s, f, f"{n} updates < 2f+3={2 * f + 3}")
        scores = krum_scores(pairwise_sq_distances([u.flat for u in s.updates]), f)
        best = int(torch.argmin(scores))
        chosen = s.updates[best]
        return AggregationResult(chosen.flat.to(torch.float32).clone(), used=[chosen.peer_id], rejected=s.rejected, note=s.note())


class MultiKrum(_Robust):
    """Multi-Krum: average of the m updates with the best Krum scores (m defaults to n - f)."""

    name = "MultiKrum"
    params: p.MultiKrumParams

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        f = self.tolerated_f()
        n = len(s.updates)
        if n < 2 * f + 3:
            return self.fallback(s, f, f"{n} updates < 2f+3={2 * f + 3}")
        scores = krum_scores(pairwise_sq_distances([u.flat for u in s.updates]), f)
        m = min(self.params.m or n - f, n - f)
        best = torch.topk(scores, m, largest=False).indices.sort().values.tolist()
        flat = weighted_mean_rows([s.updates[i].flat for i in best])
        return AggregationResult(flat, used=[s.updates[i].peer_id for i in best], rejected=s.rejected, note=s.note())


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop k values per side.

    k = f (``params.f``, else the manifest's byzantine_f); with ``trim_ratio`` k = max(ceil(trim_ratio * n), f), so a
    ratio can trim more than f but never fewer. Fewer than 2k + 1 updates fall back like the other robust rules.
    """

    name = "TrimmedMean"
    params: p.TrimmedMeanParams

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        n = len(s.updates)
        f = self.tolerated_f()
        k, extra = f, ""
        ratio = self.params.trim_ratio
        if ratio is not None:
            # The epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from trimming one value more.
            by_ratio = math.ceil(ratio * n - 1e-9)
            k = max(by_ratio, f)
            if by_ratio < f:
                extra = f"trim_ratio={ratio:g} gives {by_ratio} per side, raised to f={f}"
        if n < 2 * k + 1:
            # The fallback decides by the attackers tolerated (f), not by the ratio's k: with f = 0 two updates
            # may still be averaged, with f >= 1 the node keeps its own model.
            why = f"{n} updates < 2f+1={2 * k + 1}"
            if k > f:
                why = f"{n} updates < 2k+1={2 * k + 1} (k={k} from trim_ratio={ratio:g})"
            return self.fallback(s, f, why)
        flat = trimmed_mean([u.flat for u in s.updates], k)
        return AggregationResult(flat, used=s.ids, rejected=s.rejected, note=s.note(extra))


class Median(_Robust):
    """Coordinate-wise median; tolerates f attackers with n >= 2f + 1 updates."""

    name = "Median"
    params: p.NoParams

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        s = screen(local, others)
        if not s.updates:
            return _nothing_usable(local, s)
        f = self.byzantine_f
        n = len(s.updates)
        if n < 2 * f + 1:
            return self.fallback(s, f, f"{n} updates < 2f+1={2 * f + 1}")
        return AggregationResult(coordinate_median([u.flat for u in s.updates]), used=s.ids, rejected=s.rejected, note=s.note())


# ----------------------------------------------------------------------------------------------------------------
# SCAFFOLD


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020) without a server.

    Each peer keeps its control variate c_i and, in place of the server's c, a running average of the variates
    its peers send (``extras[CONTROL_VARIATE_KEY]``): c <- m c + (1 - m) mean(c_j), starting from the first mean.
    Every local gradient is corrected by (c - c_i) after backward. After local training c_i becomes the average
    of the round's uncorrected local gradients. For plain SGD that is exactly option II of the paper,
    c_i - c + (x - y) / (K lr); unlike that formula it stays right when the optimizer has momentum, weight decay
    or adaptive steps (the model difference then no longer measures K lr times the gradient). Models are averaged
    as in FedAvg. Variates cover the trainable parameters in ``model.parameters()`` order. The paper's analysis
    assumes small local steps (lr of order 1 / (K L) for K steps on an L-smooth loss); momentum beta multiplies the
    effective rate by 1 / (1 - beta), and rates far above that make the correction loop oscillate.
    """

    name = "Scaffold"
    params: p.ScaffoldParams

    def __init__(self, params: p.Params, byzantine_f: int = 0) -> None:
        super().__init__(params, byzantine_f)
        self.c_local: torch.Tensor | None = None
        self.c_global: torch.Tensor | None = None
        self._params: list[nn.Parameter] = []
        self._correction: list[torch.Tensor] = []
        self._grad_sum: list[torch.Tensor] = []
        self._grad_steps = 0

    def begin_training(self, model: nn.Module, lr: float) -> None:
        self._params = _trainable(model)
        d = sum(q.numel() for q in self._params)
        if self.c_local is None or self.c_local.numel() != d:
            self.c_local = torch.zeros(d)
        if self.c_global is not None and self.c_global.numel() != d:
            self.c_global = None
        correction = (torch.zeros(d) if self.c_global is None else self.c_global) - self.c_local
        sizes = [q.numel() for q in self._params]
        self._correction = [
            chunk.view_as(q).to(q.dtype) for chunk, q in zip(torch.split(correction, sizes), self._params, strict=True)
        ]
        self._grad_sum = [torch.zeros_like(q, dtype=torch.float32) for q in self._params]
        self._grad_steps = 0

    def after_backward(self, model: nn.Module) -> None:
        if not self._correction:
            return
        present = [(i, q.grad) for i, q in enumerate(self._params) if q.grad is not None]
        if not present:
            return
        idx = [i for i, _ in present]
        grads: list[torch.Tensor] = [g for _, g in present]
        torch._foreach_add_([self._grad_sum[i] for i in idx], [g.float() for g in grads])
        self._grad_steps += 1
        torch._foreach_add_(grads, [self._correction[i] for i in idx])

    def end_training(self, model: nn.Module, steps: int, lr: float) -> None:
        if self._grad_steps > 0:
            self.c_local = _flat_params(self._grad_sum) / self._grad_steps
        self._correction = []
        self._grad_sum = []
        self._grad_steps = 0

    def extras_to_send(self) -> dict[str, torch.Tensor]:
        return {} if self.c_local is None else {CONTROL_VARIATE_KEY: self.c_local.clone()}

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        result = super().aggregate(local, others, current_round)
        if self.c_local is None:
            return result
        used = set(result.used)
        candidates: list[tuple[str, torch.Tensor]] = []
        bad: list[str] = []
        for u in others:
            if u.peer_id not in used:
                continue
            c = u.extras.get(CONTROL_VARIATE_KEY)
            if c is None or c.dim() != 1 or c.numel() != self.c_local.numel() or not _finite(c):
                bad.append(u.peer_id)
            else:
                candidates.append((u.peer_id, c.to(torch.float32)))
        # A poisoned variate corrects every later gradient step: bounded against our own like the models.
        variates = [self.c_local]
        bounded = bound_outliers(self.c_local, [c for _, c in candidates])
        for (peer_id, c), (c_bounded, dist, bounds) in zip(candidates, bounded, strict=True):
            if c_bounded is None:
                bad.append(peer_id)
                emit(log, logging.WARNING, "variate-refused", peer=peer_id, distance=dist, limit=bounds.refuse,
                     scale=bounds.scale)
                continue
            if c_bounded is not c:
                emit(log, logging.WARNING, "variate-clipped", peer=peer_id, distance=dist, limit=bounds.clip,
                     scale=bounds.scale)
            variates.append(c_bounded)
        mean_c = torch.stack(variates).mean(dim=0)
        m = self.params.variate_momentum
        if self.c_global is None or self.c_global.numel() != mean_c.numel():
            self.c_global = mean_c
        else:
            self.c_global = self.c_global.mul(m).add_(mean_c, alpha=1.0 - m)
        if bad:
            extra = f"no usable control variate from {','.join(bad)}"
            result.note = f"{result.note}; {extra}" if result.note else extra
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        if self.c_local is not None:
            state["c_local"] = self.c_local.clone()
        if self.c_global is not None:
            state["c_global"] = self.c_global.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = set(state) - {"c_local", "c_global"}
        if unknown:
            raise ValueError(f"Scaffold state has unknown entries {sorted(unknown)}")
        for key, value in state.items():
            if value.dim() != 1 or not _finite(value):
                raise ValueError(f"Scaffold {key} in the checkpoint is not a finite vector")
        self.c_local = state["c_local"].to(torch.float32).clone() if "c_local" in state else None
        self.c_global = state["c_global"].to(torch.float32).clone() if "c_global" in state else None
