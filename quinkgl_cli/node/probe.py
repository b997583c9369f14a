"""The dry run's probe (`quinkgl run --dry-run`): the first batch of each loader through the model and its loss,
the way training and evaluation take them, so that a model or loss that fails on the script's real data fails the
dry run with the run's own one-line error (exit 7, `quinkgl_cli.batches.batch_failed`).

Cheap and without effect on the model: one batch a loader, no backward pass, no optimizer step; the training batch runs
in training mode (a model may fail only there, BatchNorm on a batch of one), and the buffers that mode updates
(BatchNorm's running statistics) are put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def probe_batches(model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...],
                  loaders: dict[str, Iterable[Any] | None]) -> list[str]:
    """Run the first batch of each loader (``train``, ``val``, ``own``; None ones skipped) through ``model`` and
    ``loss_fn``; the names of those that gave a batch. A failure is a one-line `NodeConfigError` (exit 7)."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    probed: list[str] = []
    try:
        with torch.no_grad():
            for name, loader in loaders.items():
                if loader is not None and _probe(model, loss_fn, input_shape, name, loader, device):
                    probed.append(name)
    finally:
        model.train(was_training)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return probed


def _probe(model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], name: str, loader: Iterable[Any],
           device: torch.device) -> bool:
    try:
        batch = next(iter(loader), None)
    except Exception as exc:  # the script's dataset or collate function
        raise NodeConfigError(f"the {name} loader failed on its first batch: {one_line(exc)}",
                              "fix build_loaders or the dataset it reads") from exc
    if batch is None:
        return False
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
        raise batch_failed(exc, x, y, input_shape, _WHERE[name]) from exc
    return True
