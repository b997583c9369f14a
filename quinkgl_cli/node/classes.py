"""Predicted and true class ids of one batch: the one reading of outputs and targets behind every accuracy a node
reports (training, evaluation, DP-SGD's pass, the per-class counts of ``own_accuracy``).

Class scores are the outputs' dimension 1 (segmentation: per pixel), predicted by their argmax; one-hot or soft
float targets by theirs. One output column is a binary classifier's logit, BCEWithLogitsLoss's convention:
positive above 0, against a target above 0.5 (float) or the class id itself. The argmax of a single column is 0
for every sample, which made every (batch, 1) float target a hit.
"""

from __future__ import annotations

from typing import Any

import torch


def class_pairs(out: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(predicted, true) class ids of a batch; None when the outputs are not class scores or the targets do not
    match them."""
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or out.dim() < 2:
        return None
    if out.dim() == 2 and out.shape[1] == 1:
        if y.numel() != out.shape[0]:
            return None
        target = y.reshape(-1)
        return (out[:, 0] > 0).long(), (target > 0.5).long() if target.is_floating_point() else target
    pred = out.argmax(dim=1)
    target = y.argmax(dim=1) if y.is_floating_point() and y.dim() == out.dim() else y
    return (pred, target) if target.shape == pred.shape else None
