"""What an aggregation does to the user's adaptive optimizer: its second moments are floored at their tensor's median.

An aggregation replaces the model; the optimizer the peer script built keeps its state, which describes this
peer's data only. Adam-type optimizers step by ``m / sqrt(v)`` per coordinate. On label-skewed data the
coordinates a peer's data barely touches (the output rows of classes it does not hold) have tiny ``v``, so Adam
takes full-size steps on their tiny but consistent gradients: every peer that lacks a class pushes it down as
hard as the one peer holding it pushes it up, and after averaging the class is lost (MLP+Adam on 4 label-disjoint
peers: digits 2 and 9, held by one peer each, were never predicted; 71% where centralized training reaches 97%).
Raising each second-moment tensor to at least its own median after every aggregation makes such coordinates step
in proportion to their gradient, as SGD does, and leaves the coordinates the peer's data drives as they were. The
median, not the mean: raising the low half to the median leaves the median where it was, so floors of successive
aggregations do not compound, and it left no cell worse where the mean's floor lost 3-4 points of worst peer
(MLP+Adam on dirichlet:0.1).
Measured with `benchmarks/bench_learning.py` (benchmarks/LEARNING.md, "Adam's second moments at aggregation").

Zero traffic and no state of its own: the floored moments are the optimizer's, which checkpoints already hold.
Only the keys of PyTorch's Adam family are touched (``exp_avg_sq`` of Adam, AdamW, NAdam and RAdam, and AMSGrad's
``max_exp_avg_sq``); SGD's momentum buffers and any optimizer with other state (RMSprop, Adagrad, a user's own) are
left as they are: resetting or rescaling first moments was measured and hurt (benchmarks/LEARNING.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def floor_second_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> int:
    """Raise every second-moment tensor of ``params`` in ``optimizer``'s state to at least its median; how many
    tensors there were. Tensors that are not shaped like their parameter (a factored or scalar state) are left."""
    floored = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in SECOND_MOMENTS:
            v = state.get(key)
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point() and v.numel() > 1:
                with torch.no_grad():
                    v.clamp_(min=float(v.flatten().median()))
                floored += 1
    return floored
