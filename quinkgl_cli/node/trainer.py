"""Local training and evaluation: the only part of a node that runs off the driver's thread (the daemon runs
`Trainer.train` and `Trainer.evaluate` in a worker thread while its event loop keeps serving the network).

Owns the model, the training and validation loaders, the optimizer, the loss function and the sample count this
peer reports (the size of its training set, or what one pass counted when the loader has no sized dataset), and the
last good model: the model as the last training that kept a finite loss left it. A non-finite loss (a poisoned
aggregate that slipped past the aggregator's bounds) rolls the model back to it and trains the round again from
there; only when that fails too, or there is no good model yet, does training stop the node. Also
owns the model's and optimizer's part of a checkpoint (`state_dict` / `load_state_dict`). The aggregator's training
hooks (FedProx's proximal term, SCAFFOLD's control variates) and local DP's clip-and-noise are called here, around
the optimizer steps, because they must see every step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.strategies.base import Aggregator
from quinkgl_cli.strategies.sharing import SharingPipeline
from quinkgl_cli.tensors import flatten, load_flat

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainStats:
    loss: float | None
    accuracy: float | None
    samples: int  # training samples in one pass over the local data (the weight this peer reports)
    steps: int
    duration: float
    rolled_back_from: float | None = None  # the non-finite loss that made this round start again from the last good model


class _NonFiniteLoss(Exception):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss {loss}")
        self.loss = loss


@dataclass(frozen=True)
class EvalStats:
    val_loss: float | None
    val_accuracy: float | None
    duration: float


def default_loss(manifest: Manifest) -> LossFn:
    """Cross-entropy for classification and segmentation, mean squared error for regression."""
    if manifest.task.type == "regression" or manifest.task.label_type == "float":
        return nn.MSELoss()
    return nn.CrossEntropyLoss()


class Trainer:
    """Trains and evaluates one model. ``reported_samples`` fixes the weight this peer reports (the simulator's
    FedAvg server, which trains on nothing); otherwise it is the training set's size. ``fresh_optimizer`` clears
    the optimizer's state whenever an aggregation replaced the model (FedAvg clients start from the global model
    anew each time they take part)."""

    def __init__(self, manifest: Manifest, model: nn.Module, train_loader: Iterable[Any],
                 val_loader: Iterable[Any] | None, optimizer: torch.optim.Optimizer, loss_fn: LossFn | None,
                 local_epochs: int, local_steps: int | None, reported_samples: int | None = None,
                 fresh_optimizer: bool = False) -> None:
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss(manifest)
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.classification = manifest.task.type in ("classification", "segmentation")
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.fresh_optimizer = fresh_optimizer
        self.sample_count = reported_samples if reported_samples is not None else _dataset_size(train_loader)
        # Set by a driver: ends local training at the next batch (a daemon asked to stop).
        self.stop_flag: threading.Event | None = None
        # The model (shared state, flat) after the last training that kept a finite loss; None before the first.
        self.last_good: torch.Tensor | None = None

    def lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(groups[0].get("lr", 0.0)) if groups else 0.0

    def train(self, round_: int, aggregator: Aggregator, sharing: SharingPipeline) -> TrainStats:
        """``local_epochs`` passes over the training data, at most ``local_steps`` optimizer steps.

        A non-finite loss rolls the model back to the last good one (and clears the optimizer's state, which the
        bad steps fed) and trains the round once more; a second one, or one before any good round, is an error."""
        started = time.perf_counter()
        rolled_back_from: float | None = None
        try:
            stats = self._train_pass(aggregator, sharing)
        except _NonFiniteLoss as bad:
            if self.last_good is None:
                raise _diverged(bad.loss, round_) from None
            rolled_back_from = bad.loss
            load_flat(self.model, self.last_good)
            self.optimizer.state.clear()
            try:
                stats = self._train_pass(aggregator, sharing)
            except _NonFiniteLoss as again:
                raise _diverged(again.loss, round_) from None
        self.last_good = flatten(self.model)
        stats.duration = time.perf_counter() - started
        stats.rolled_back_from = rolled_back_from
        return stats

    def _train_pass(self, aggregator: Aggregator, sharing: SharingPipeline) -> TrainStats:
        """One round's training from the current model; `_NonFiniteLoss` before a non-finite loss is stepped on."""
        started = time.perf_counter()
        model = self.model
        model.train()
        lr = self.lr()
        aggregator.begin_training(model, lr)
        if sharing.dp.enabled:
            sharing.begin_training(flatten(model))
        total_loss = 0.0
        correct = 0
        seen = 0
        steps = 0
        samples_first_epoch = 0
        done = False
        for epoch in range(self.local_epochs):
            for batch in self.train_loader:
                x, y = _split_batch(batch, self.device)
                self.optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = self.loss_fn(out, y)
                extra = aggregator.loss_term(model)
                if extra is not None:
                    loss = loss + extra
                if not torch.isfinite(loss):
                    raise _NonFiniteLoss(float(loss.item()))
                loss.backward()
                aggregator.after_backward(model)
                self.optimizer.step()
                n = _batch_len(y)
                total_loss += float(loss.detach()) * n
                seen += n
                if epoch == 0:
                    samples_first_epoch += n
                hits = _correct(out.detach(), y)
                if hits is not None:
                    correct += hits
                steps += 1
                if (self.local_steps is not None and steps >= self.local_steps) or (
                    self.stop_flag is not None and self.stop_flag.is_set()
                ):
                    done = True
                    break
            if done:
                break
        aggregator.end_training(model, steps, lr)
        if sharing.dp.enabled:
            noised = sharing.end_training(flatten(model))  # clip + noise the round's update, keep it
            if noised is not None:
                load_flat(model, noised)
        if self.sample_count <= 0:
            self.sample_count = samples_first_epoch
        return TrainStats(
            loss=total_loss / seen if seen else None,
            accuracy=correct / seen if seen and self.classification else None,
            samples=self.sample_count or samples_first_epoch,
            steps=steps,
            duration=time.perf_counter() - started,
        )

    def evaluate(self, model: nn.Module | None = None) -> EvalStats | None:
        """Loss and accuracy of ``model`` (default: the trained one) on the validation loader; None when there is no
        validation loader."""
        if self.val_loader is None:
            return None
        started = time.perf_counter()
        model = self.model if model is None else model
        model.eval()
        total = 0.0
        correct = 0
        seen = 0
        with torch.no_grad():
            for batch in self.val_loader:
                x, y = _split_batch(batch, self.device)
                out = model(x)
                n = _batch_len(y)
                total += float(self.loss_fn(out, y)) * n
                hits = _correct(out, y)
                if hits is not None:
                    correct += hits
                seen += n
        return EvalStats(total / seen if seen else None, correct / seen if seen and self.classification else None,
                         time.perf_counter() - started)

    def model_replaced(self) -> None:
        """An aggregation loaded a new model."""
        if self.fresh_optimizer:
            self.optimizer.state.clear()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model and optimizer as (tensors, JSON): ``model.*`` and ``optim.<param>.<key>`` tensors, the optimizer's
        param groups and non-tensor state in JSON. CPU tensors are views of the live state, not copies."""
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            tensors[f"model.{name}"] = t.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = json_scalar(value)
        meta = {"param_groups": [{k: json_scalar(v) for k, v in g.items()} for g in opt["param_groups"]],
                "scalars": opt_scalars}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], sample_count: int) -> None:
        """Restore what `state_dict` saved; the model and optimizer must be the same shapes."""
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model (missing {len(missing)}, unexpected {len(unexpected)} entries)")
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        for idx, scalars in meta["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        if sample_count > 0 and self.sample_count <= 0:
            self.sample_count = sample_count


def _diverged(loss: float, round_: int) -> NodeConfigError:
    return NodeConfigError(f"training loss became {loss} in round {round_}", "lower the learning rate in build_optimizer")


def json_scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_scalar(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise ValueError(f"optimizer state value of type {type(value).__name__} cannot be checkpointed")


def _dataset_size(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        try:
            return int(len(dataset))
        except TypeError:
            return 0
    return 0


def _split_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """(inputs, targets) of a batch, on the model's device (loaders yield CPU tensors; a script may build a GPU model)."""
    if isinstance(batch, dict):
        x, y = batch.get("x", batch.get("input")), batch.get("y", batch.get("target"))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise NodeConfigError(f"a batch must be (inputs, targets), got {type(batch).__name__}",
                              "make build_loaders return loaders that yield (x, y) pairs")
    if device.type != "cpu":
        x = x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        y = y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else y
    return x, y


def _batch_len(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 1


def _correct(out: torch.Tensor, y: torch.Tensor) -> int | None:
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or out.dim() < 2:
        return None
    pred = out.argmax(dim=1)
    target = y.argmax(dim=1) if y.is_floating_point() and y.dim() == out.dim() else y
    if target.shape != pred.shape:
        return None
    return int((pred == target).sum())
