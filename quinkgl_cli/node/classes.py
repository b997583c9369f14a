"""Predicted and true class ids of one batch: the one reading of outputs and targets behind every accuracy a node
reports (training, evaluation, DP-SGD's pass, the per-class counts of ``own_accuracy``).

Class scores are the outputs' dimension 1 (segmentation: per pixel), predicted by their argmax; one-hot or soft
float targets by theirs. One output column is a binary classifier's score, positive above a threshold, against a
target above 0.5 (float) or the class id itself. The argmax of a single column is 0 for every sample, which made
every (batch, 1) float target a hit.

That column is a logit (threshold 0, BCEWithLogitsLoss's convention) unless the model ends in ``nn.Sigmoid`` or the
loss is ``nn.BCELoss`` / ``F.binary_cross_entropy`` (a loss function that calls them on ``sigmoid(outputs)`` takes
logits): then it is a probability (threshold 0.5), which a logit reading counts positive for every sample. The
reading is decided once, from the model and the loss a node is built with (`class_reading`), never from the values
of a batch.

Several output columns trained with a binary cross-entropy (``nn.BCEWithLogitsLoss``, ``nn.BCELoss`` or their
functions) are a multi-label classifier's: each column is one label, positive above the threshold, against a
multi-hot target row. The argmax of such rows matched whenever the first positive label had the highest score (0.57
for a model that had learned its four labels); a sample is now a hit when every label is right, as scikit-learn's
``accuracy_score`` scores multi-label data, and no per-class counts are kept (a sample holds several classes).

A model with several heads returns a tuple (or list, or dict) of tensors, which its ``loss_fn`` takes apart; the
class scores are the first of them whose per-sample shape is the task's output shape (the prediction the manifest
describes). Outputs without one report no accuracy (None), not 0.0.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Names under which a loss function calls a loss on probabilities (nn.BCELoss, F.binary_cross_entropy).
_PROBABILITY_LOSSES = frozenset({"BCELoss", "binary_cross_entropy"})
# ... or any binary cross-entropy, which scores each output column as a label of its own.
_BINARY_LOSSES = _PROBABILITY_LOSSES | {"BCEWithLogitsLoss", "binary_cross_entropy_with_logits"}


@dataclass(frozen=True)
class ClassReading:
    """How one node reads a single output column: as a probability (positive above 0.5) or a logit (above 0); and
    how many class ids its targets may hold (0..count-1), for the one line a label outside them gets
    (`quinkgl_cli.batches.batch_failed`)."""

    probabilities: bool = False
    count: int | None = None
    output_shape: tuple[int, ...] | None = None  # the task's, per sample: picks the scores among several outputs
    multilabel: bool = False  # several columns under a binary cross-entropy: one label each, not class scores

    def scores(self, out: Any) -> torch.Tensor | None:
        """The class scores among a batch's outputs: the outputs when they are one tensor, else the first tensor of a
        tuple or list (or the first value of a dict, ``{"logits": ...}``) shaped like the task's output; None when
        there is none."""
        if isinstance(out, torch.Tensor):
            return out
        several = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
        return next((t for t in several if isinstance(t, torch.Tensor) and t.dim() >= 2
                     and tuple(t.shape[1:]) == self.output_shape), None)

    def pairs(self, outputs: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(predicted, true) class ids of a batch; None when the outputs hold no class scores or the targets do not
        match them."""
        out = self.scores(outputs)
        if out is None or not isinstance(y, torch.Tensor) or out.dim() < 2:
            return None
        threshold = 0.5 if self.probabilities else 0.0
        if out.dim() == 2 and out.shape[1] == 1:
            if y.numel() != out.shape[0]:
                return None
            target = y.reshape(-1)
            return (out[:, 0] > threshold).long(), (target > 0.5).long() if target.is_floating_point() else target
        if self.multilabel and out.dim() == 2:  # per-pixel scores (segmentation) keep the argmax
            if y.shape != out.shape:
                return None
            right = ((out > threshold) == (y > 0.5)).all(dim=1).long()
            return right, torch.ones_like(right)  # a hit where every label is right
        pred = out.argmax(dim=1)
        target = y.argmax(dim=1) if y.is_floating_point() and y.dim() == out.dim() else y
        return (pred, target) if target.shape == pred.shape else None


def class_reading(model: nn.Module, loss_fn: Callable[..., Any], output_shape: tuple[int, ...]) -> ClassReading:
    """Probabilities when ``model``'s last module is ``nn.Sigmoid`` or ``loss_fn`` is (or calls) a loss on
    probabilities; logits otherwise. ``output_shape`` is the task's (class scores first)."""
    last = list(model.modules())[-1]  # the model itself when it has no submodules
    multilabel = int(output_shape[0]) > 1 and _uses(loss_fn, _BINARY_LOSSES, (nn.BCELoss, nn.BCEWithLogitsLoss))
    return ClassReading(isinstance(last, nn.Sigmoid) or _takes_probabilities(loss_fn), class_count(output_shape),
                        tuple(output_shape), multilabel)


CLASS_TASKS = ("classification", "segmentation")  # the task types whose targets are class ids


def task_class_count(task_type: str, output_shape: tuple[int, ...]) -> int | None:
    """The class ids a task's targets may hold; None for a task without class labels (regression, detection)."""
    return class_count(output_shape) if task_type in CLASS_TASKS else None


def class_count(output_shape: tuple[int, ...]) -> int:
    """The class ids a classification or segmentation task's targets may hold: one per score, two for a single
    binary column."""
    return max(2, int(output_shape[0]))


def _takes_probabilities(loss_fn: Callable[..., Any]) -> bool:
    return _uses(loss_fn, _PROBABILITY_LOSSES, (nn.BCELoss,), logits_if_sigmoid=True)


def _uses(loss_fn: Callable[..., Any], names: frozenset[str], modules: tuple[type[nn.Module], ...],
          logits_if_sigmoid: bool = False) -> bool:
    """Whether ``loss_fn`` is one of ``modules``, or a function that calls a loss named in ``names`` or one of
    ``modules`` it holds (``logits_if_sigmoid``: not when it applies ``sigmoid`` itself)."""
    fn = inspect.unwrap(loss_fn)
    if isinstance(fn, nn.Module):
        return isinstance(fn, modules)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return False
    scope = dict(getattr(fn, "__globals__", {}))
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
    called = set(_names(code))
    if logits_if_sigmoid and "sigmoid" in called:  # binary_cross_entropy(torch.sigmoid(outputs), ...): logits
        return False
    return bool(called & names) or any(isinstance(scope.get(n), modules) for n in called)


def _names(code: types.CodeType) -> Iterator[str]:
    """The global, attribute and free names ``code`` and the functions nested in it refer to."""
    yield from code.co_names
    yield from code.co_freevars
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)
