"""Slow momentum on the aggregated change: the gossip form of FedAvgM (Hsu et al.), around any averaging rule.

``delta = rule(updates) - reference``, where the reference is the model this node held when its local training
began (between gossip steps of one round: the previous aggregation's result); ``v = beta v + delta``; the new model
is ``reference + v``. With ``beta = 0`` this is the rule itself, and so is a node's first aggregation (v starts at
zero there).

Why a node default (`node.core.build_aggregator` wraps the plain averaging rules in it, ``BETA``): on label-skewed
splits every exchange averages a few models that each drifted toward their own classes, so the swarm's progress per
round is small and noisy; accumulating it over rounds moves the models faster along the direction the rounds agree
on and damps what they do not. Measured with `benchmarks/bench_learning.py` (benchmarks/LEARNING.md; four model
families and optimizers, three splits, two seeds): at the same traffic the served models' mean accuracy over rounds
10-15 rises 3.8-9.6 points on every 20-peer split and 4-9 points on label-disjoint 4-peer swarms (MLP+Adam there:
unchanged), the worst peer never falls by more than a point in a cell; ``beta = 0.9`` (FedAvgM's default)
overshoots with an MLP's own SGD momentum (69% vs 78%).

Averaging-only exchanges (the end-of-run merge, `begin_consensus`) drop the momentum: they must only pull the
peers together, and a velocity carried into them moves every peer the same way several times over.

Momentum carries the training trajectory on, so it moves only the entries training moves (`hold_still`): a
BatchNorm running variance carried past the average goes negative, and every evaluation of the model then returns
NaN while its training, on batch statistics, looks healthy (a BatchNorm CNN with AdamW, 20 peers, shards:2: every
peer at 10% validation accuracy from round 9 on).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quinkgl_cli.strategies.base import AggregationResult, Aggregator, AggregatorWrapper, PeerUpdate
from quinkgl_cli.tensors import flatten, still_mask

BETA = 0.5
STATE_KEY = "slow_momentum"


def hold_still(new: torch.Tensor, plain: torch.Tensor, velocity: torch.Tensor, still: torch.Tensor | None) -> None:
    """Give the entries no optimizer step moves (``still``, from `tensors.still_mask`; None: none) the rule's
    ``plain`` average in ``new`` and no velocity, in place."""
    if still is None or still.numel() != new.numel():
        return
    new[still] = plain[still]
    velocity[still] = 0.0


class SlowMomentum(AggregatorWrapper):
    """``inner``'s average, moved by the slow momentum above. Training hooks, extras and the rest of the state are
    the rule's own; ``name`` and ``params`` are the rule's (what logs and the manifest call it)."""

    def __init__(self, inner: Aggregator, beta: float = BETA) -> None:
        super().__init__(inner)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum {beta} is outside [0, 1)")
        self.beta = beta
        self._velocity: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        self._still: torch.Tensor | None = None  # known once training began: before, nothing tells buffers apart
        self._merging = False

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        result = self.inner.aggregate(local, others, current_round)
        if not result.used or self._merging:
            return result
        ref = self._reference
        if ref is None or ref.numel() != result.flat.numel():
            ref = local.flat.to(torch.float32)
        delta = result.flat - ref
        if self._velocity is None or self._velocity.numel() != delta.numel():
            # The first aggregation only joins the swarm: its change is mostly this peer's distance to the others
            # (a late joiner, peers started from different weights), which carried on would push it past them.
            self._velocity = torch.zeros_like(delta)
        else:
            self._velocity.mul_(self.beta).add_(delta)
            moved = ref + self._velocity
            hold_still(moved, result.flat, self._velocity, self._still)
            result.flat = moved
        self._reference = result.flat.clone()
        return result

    def begin_consensus(self) -> None:
        self._merging = True
        self._velocity = None
        self.inner.begin_consensus()

    def begin_training(self, model: nn.Module, lr: float) -> None:
        self._reference = flatten(model)
        self._still = still_mask(model)
        self.inner.begin_training(model, lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.inner.state_dict()
        if self._velocity is not None:
            state[STATE_KEY] = self._velocity.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The rule's state plus the velocity; a checkpoint without one (older, or saved before any aggregation)
        starts from zero."""
        rest = dict(state)
        velocity = rest.pop(STATE_KEY, None)
        if velocity is not None and (velocity.dim() != 1 or not bool(torch.isfinite(velocity).all())):
            raise ValueError("slow momentum in the checkpoint is not a finite vector")
        self.inner.load_state_dict(rest)
        self._velocity = None if velocity is None else velocity.to(torch.float32).clone()
