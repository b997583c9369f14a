"""The dry run's probe (`quinkgl run --dry-run`): the first batch of each loader through the model and its loss,
the way training and evaluation take them, so that a model or loss that fails on the script's real data fails the
dry run with the run's own one-line error (exit 7, `quinkgl_cli.batches.batch_failed`).

Cheap and without effect on the model: one batch a loader, no backward pass, no optimizer step; the training batch runs
in training mode (a model may fail only there, BatchNorm on a batch of one), and the buffers that mode updates
(BatchNorm's running statistics) are put back afterwards.

It also reads each first batch's inputs per sample (`Probed.shape_mismatches`): a loader whose inputs differ from the
manifest's input shape (a GRU manifest for length-20 sequences fed length-30 ones) runs on a model that accepts
both, silently outside the task every peer of the swarm agreed on; the dry run warns of it. A warning, not a
refusal: collated batches of padded sequences legitimately vary in length from batch to batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quinkgl_cli.batches import batch_failed
from quinkgl_cli.errors import NodeConfigError, QuinkglError
from quinkgl_cli.node.nodelog import one_line
from quinkgl_cli.node.personal import LossFn
from quinkgl_cli.node.trainer import split_batch

# The name each loader's failures carry, as the trainer names them.
_WHERE = {"train": "training", "val": "evaluation", "own": "evaluation"}


@dataclass
class Probed:
    """What the probe saw: the loaders that gave a batch, in order, and the per-sample shape of each one's inputs
    (where they are one tensor)."""

    loaders: list[str] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def shape_mismatches(self, input_shape: tuple[int, ...]) -> dict[tuple[int, ...], list[str]]:
        """The loaders whose inputs per sample are not ``input_shape``, by the shape they gave."""
        found: dict[tuple[int, ...], list[str]] = {}
        for name, shape in self.input_shapes.items():
            if shape != tuple(input_shape):
                found.setdefault(shape, []).append(name)
        return found


def probe_batches(model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...],
                  loaders: dict[str, Iterable[Any] | None], class_ids: int | None = None) -> Probed:
    """Run the first batch of each loader (``train``, ``val``, ``own``; None ones skipped) through ``model`` and
    ``loss_fn``. A failure is a one-line `NodeConfigError` (exit 7); ``class_ids`` (None for regression) names a
    label outside the task's classes (`batch_failed`)."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    probed = Probed()
    try:
        with torch.no_grad():
            for name, loader in loaders.items():
                if loader is None:
                    continue
                shape = _probe(model, loss_fn, input_shape, class_ids, name, loader, device)
                if shape is not None:
                    probed.loaders.append(name)
                    if shape:
                        probed.input_shapes[name] = shape
    finally:
        model.train(was_training)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return probed


def _probe(model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], class_ids: int | None, name: str,
           loader: Iterable[Any], device: torch.device) -> tuple[int, ...] | None:
    """The per-sample shape of the first batch's inputs (empty when they are not one tensor with a batch
    dimension), None when the loader gave no batch."""
    try:
        batch = next(iter(loader), None)
    except Exception as exc:  # the script's dataset or collate function
        raise NodeConfigError(f"the {name} loader failed on its first batch: {one_line(exc)}",
                              "fix build_loaders or the dataset it reads") from exc
    if batch is None:
        return None
    x, y = split_batch(batch, device)
    model.train(name == "train")
    try:
        # The training batch with autograd on, as training takes it (a loss cut off from the outputs shows only
        # then); nothing is stepped or kept.
        with torch.set_grad_enabled(name == "train"):
            loss_fn(model(x), y)
    except QuinkglError:
        raise
    except Exception as exc:
        raise batch_failed(exc, x, y, input_shape, _WHERE[name], class_ids) from exc
    return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() > 1 else ()
