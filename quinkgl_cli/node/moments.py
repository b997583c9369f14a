"""What an aggregation does to the state of the user's optimizer: Adam's (RMSprop's, Adagrad's) second moments
are floored at their tensor's median, SGD's momentum buffers become the round's movement of the model
(quasi-global momentum).

An aggregation replaces the model; the optimizer the peer script built keeps its state, which describes this
peer's data and this peer's path only. Measured with `benchmarks/bench_learning.py` (benchmarks/LEARNING.md,
"The optimizer's state at aggregation"); zero traffic each.

Adam-type optimizers step by ``m / sqrt(v)`` per coordinate. On label-skewed data the coordinates a peer's data
barely touches (the output rows of classes it does not hold) have tiny ``v``, so Adam takes full-size steps on
their tiny but consistent gradients: every peer that lacks a class pushes it down as hard as the one peer holding it
pushes it up, and after averaging the class is lost (MLP+Adam on 4 label-disjoint peers: digits 2 and 9, held by
one peer each, were never predicted). Raising each second-moment tensor to at least its own median after every
aggregation makes such coordinates step in proportion to their gradient, as SGD does, and leaves the coordinates
the peer's data drives as they were. The median, not the mean: raising the low half to the median leaves the
median where it was, so floors of successive aggregations do not compound, and it left no cell worse where the
mean's floor lost 3-4 points of worst peer (MLP+Adam on dirichlet:0.1).

SGD's momentum buffer carries the direction of this peer's own last steps into the next round, a direction the
aggregation just averaged away. Quasi-global momentum (Lin et al., 2021, here at aggregation) mixes into it the
model's displacement since its local training began (training, then aggregation) per local step: the swarm's
direction, in the buffer's units (SGD steps by ``lr * buffer``, with or without dampening, Nesterov or maximize).
Half and half (``MIX``): replacing the buffer outright lifts the served models about as much but costs the CNN 3
points of final accuracy on shards:2 and a 5.3-point drop between rounds. Not after an aggregation whose poison
guard refused or clipped an update: momentum would carry the attacker's pull on through local training (FedAvg
under two sign-flipping peers of ten: 0.39 final accuracy with it, 0.77 without).

RMSprop (``square_avg``) and Adagrad (``sum``) step by ``g / sqrt(v)`` too, and lose classes the same way; their
second moments are floored alike since 2026-12-05 (written as an outside user would, after the rule was chosen:
`benchmarks/scripts/digits_mlp_rmsprop.py` and `digits_mlp_adagrad.py`: with the floor their served models gain
on every split, three seeds each; `benchmarks/LEARNING.md`).

Only those (PyTorch's Adam family: ``exp_avg_sq`` of Adam, AdamW, NAdam and RAdam, and AMSGrad's ``max_exp_avg_sq``;
RMSprop; Adagrad) and `torch.optim.SGD` (and its subclasses) with momentum are touched; any other optimizer
(Adadelta, Adamax, a user's own) keeps its state as it is: not measured. The rules keep no state across rounds (the
round's starting point and step count live from training to that round's aggregations); what they change is the
optimizer's state, which checkpoints hold.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # the Adam family's, whatever the class
# Names other optimizers also use for other things (Adadelta's ``square_avg``): only on these classes.
SECOND_MOMENTS_OF: tuple[tuple[type[torch.optim.Optimizer], tuple[str, ...]], ...] = (
    (torch.optim.RMSprop, ("square_avg",)),
    (torch.optim.Adagrad, ("sum",)),
)


def second_moment_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The state entries of ``optimizer`` that the floor raises."""
    extra = tuple(key for cls, keys in SECOND_MOMENTS_OF if isinstance(optimizer, cls) for key in keys)
    return SECOND_MOMENTS + extra
MIX = 0.5  # the share of its own buffer an SGD momentum buffer keeps at an aggregation


def floor_second_moments(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Raise every second-moment tensor of ``params`` in ``optimizer``'s state to at least its median; how many
    tensors there were. Tensors that are not shaped like their parameter (a factored or scalar state) are left."""
    floored = 0
    keys = second_moment_keys(optimizer)
    if not any(key in state for state in optimizer.state.values() for key in keys):
        return 0  # no second moments at all (SGD): walking the model's parameters would find none
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in keys:
            v = state.get(key)
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point() and v.numel() > 1:
                with torch.no_grad():
                    v.clamp_(min=float(v.flatten().median()))
                floored += 1
    return floored


def global_momentum(optimizer: torch.optim.Optimizer, start: dict[nn.Parameter, torch.Tensor], steps: int,
                    mix: float = MIX) -> int:
    """Set the momentum buffer of every parameter in ``start`` (its value when local training began) to ``mix``
    times itself plus ``1 - mix`` times the parameter's displacement since then per local step,
    ``(start - now) / (lr * steps)``; how many buffers were set. Only `torch.optim.SGD`'s buffers, and only with
    ``steps`` and the group's learning rate above zero, and only dense buffers (an ``nn.Embedding(sparse=True)``'s is
    sparse: torch cannot add the dense movement into it, and it keeps its own)."""
    if not isinstance(optimizer, torch.optim.SGD) or steps <= 0:
        return 0
    changed = 0
    with torch.no_grad():  # once: entering it costs as much as a buffer's update on a small model
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            for p in group["params"]:
                before = start.get(p)
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if (before is None or lr <= 0 or not isinstance(buf, torch.Tensor) or buf.shape != p.shape
                        or buf.layout != torch.strided):  # a sparse embedding's buffer: its own, as torch keeps it
                    continue
                buf.mul_(mix).add_((before - p.detach()) / (lr * steps), alpha=1.0 - mix)
                changed += 1
    return changed


class MomentRules:
    """The two rules above for one trainer: ``floor`` (Adam, RMSprop, Adagrad) and ``global_momentum`` (SGD), both
    on by default and off only to measure against; the round's starting point of the shared parameters, while SGD
    has momentum."""

    def __init__(self) -> None:
        self.floor = True
        self.global_momentum = True
        self._start: dict[nn.Parameter, torch.Tensor] = {}
        self._steps = 0

    def training_begins(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
        """Remember where local training starts (SGD with momentum only: one copy of the shared parameters)."""
        self._steps = 0
        self._start = {}
        if self.global_momentum and isinstance(optimizer, torch.optim.SGD) and any(
                float(g.get("momentum", 0.0)) > 0 for g in optimizer.param_groups):
            self._start = {p: p.detach().clone() for p in params}

    def training_ended(self, steps: int) -> None:
        self._steps = steps

    def model_replaced(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                       trusted: bool = True) -> None:
        """An aggregation loaded a new model into ``params``; ``trusted``: its poison guard refused and clipped
        nothing (the node's call), else the buffers keep their own direction."""
        if self.floor:
            floor_second_moments(optimizer, params)
        if self.global_momentum and self._start and trusted:
            global_momentum(optimizer, self._start, self._steps)
