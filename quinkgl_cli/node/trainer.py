"""Local training and evaluation: the only part of a node that runs off the driver's thread (the daemon runs
`Trainer.train` and `Trainer.evaluate` in a worker thread while its event loop keeps serving the network).

Owns the model, the personalization policy (`node.personal`: which part of the model is shared, the peer's own
model; FedRep's head phase runs here before the usual training, APFL's local step after each of its steps), the
training and validation loaders, the optimizer, the loss function, the label shares that score the personal model
on this peer's own distribution (`node.owneval`), the sample count this peer reports (the size of its training
set, or what one pass counted when the loader has no sized dataset), and the last good model: the model as the last
training that kept a finite loss left it. A non-finite loss (a poisoned aggregate that slipped past the
aggregator's bounds) rolls the model back to it and trains the round again from there; only when that fails too,
or there is no good model yet, does training stop the node. Steps the script's learning-rate scheduler, if it
has one, once per round after training (`node.lrschedule`). Also owns the model's, optimizer's, scheduler's and
personalization's part of a checkpoint (`state_dict` / `load_state_dict`). The aggregator's training hooks
(FedProx's proximal term, SCAFFOLD's control variates) and local DP's clip-and-noise are called here, around the
optimizer steps, because they must see every step; they and DP see only the shared part. Under privacy mode
dp_sgd a round's pass is DP-SGD's (`node.dpsgd`, planned when the trainer is built; no personalization); its
accountant is charged for every step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from quinkgl_cli.batches import batch_failed, batch_parts
from quinkgl_cli.errors import NodeConfigError, QuinkglError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.classes import CLASS_TASKS, ClassReading, class_reading
from quinkgl_cli.node.dpsgd import DpSgdTraining, PassResult, build_dpsgd
from quinkgl_cli.node.localwork import local_passes
from quinkgl_cli.node.lrschedule import check_schedule_length, load_scheduler_state, scheduler_state, step_scheduler
from quinkgl_cli.node.moments import MomentRules
from quinkgl_cli.node.owneval import class_hits, label_shares, weighted_accuracy
from quinkgl_cli.node.personal import LossFn, Shared
from quinkgl_cli.node.state import load_optimizer_state, optimizer_state
from quinkgl_cli.strategies.base import Aggregator
from quinkgl_cli.strategies.dp_accountant import SampleAccountant
from quinkgl_cli.strategies.sharing import SharingPipeline
from quinkgl_cli.tensors import flatten, load_flat, map_outputs


@dataclass
class TrainStats:
    loss: float | None
    accuracy: float | None
    samples: int  # training samples in one pass over the local data (the weight this peer reports)
    steps: int
    duration: float
    rolled_back_from: float | None = None  # the non-finite loss that made this round start again from the last good model
    # The first training batch's inputs per sample where they are not the task's input shape (in one round only).
    input_shape: tuple[int, ...] | None = None


class InputShape:
    """The task's input shape per sample, and the first training batch's when it differs: a model that takes both
    (a GRU fed longer sequences) trains silently outside the task the swarm agreed on. Only the first batch is
    compared, as the dry run does (`node.probe`): padded batches legitimately vary in length from batch to batch."""

    def __init__(self, expected: tuple[int, ...]) -> None:
        self.expected = expected
        self.checked = False
        self.differing: tuple[int, ...] | None = None

    def see(self, x: Any) -> None:
        if self.checked:
            return
        self.checked = True
        if isinstance(x, torch.Tensor) and x.dim() > 1 and tuple(x.shape[1:]) != self.expected:
            self.differing = tuple(x.shape[1:])

    def take(self) -> tuple[int, ...] | None:
        """The differing shape, once."""
        found, self.differing = self.differing, None
        return found


def log_training(log: Callable[..., None], stats: TrainStats, expected: tuple[int, ...]) -> None:
    """What a node says about a round's training beyond its metrics (``log`` is its `NodeLog`)."""
    if stats.rolled_back_from is not None:
        log(logging.WARNING, "training-rolled-back", loss=stats.rolled_back_from,
            hint="a non-finite loss after the last aggregation: trained again from the last good model")
    if stats.input_shape is not None:  # the dry run's line, for the loader training reads
        log(logging.WARNING, "input-shape-mismatch", manifest=list(expected), batch=list(stats.input_shape),
            loaders=["train"])


class _NonFiniteLoss(Exception):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss {loss}")
        self.loss = loss


@dataclass(frozen=True)
class EvalStats:
    val_loss: float | None
    val_accuracy: float | None
    duration: float
    own_accuracy: float | None = None  # the personal model on this peer's own test data, or its label distribution
    personal_val_accuracy: float | None = None  # the personal model on the validation set
    alpha: float | None = None  # APFL's mixing weight


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
                 fresh_optimizer: bool = False, personal: Shared | None = None, rounds: int | None = None,
                 noise_seed: int | None = None, own_loader: Iterable[Any] | None = None,
                 scheduler: LRScheduler | None = None) -> None:
        self.model = model
        # What is shared (the model, or FedRep's backbone): aggregator hooks, DP and the exchange see only this.
        self.personal = personal or Shared(model)
        self.shared = self.personal.shared
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = optimizer
        self.scheduler = check_schedule_length(scheduler, rounds)  # the script's: one step per round, after training
        self.loss_fn = loss_fn or default_loss(manifest)
        floor = manifest.training.min_local_steps if self.personal.mode == "none" else 0  # personal: not measured
        self.local_epochs = local_passes(local_epochs, train_loader, floor)  # more on little data (`node.localwork`)
        self.local_steps = local_steps
        # How outputs read as class ids (a single column: logit or probability); None for regression.
        self.classes = (class_reading(model, self.loss_fn, manifest.task.output_shape)
                        if manifest.task.type in CLASS_TASKS else None)
        self.input_shape = InputShape(tuple(manifest.task.input_shape))
        self.fresh_optimizer = fresh_optimizer
        # What an aggregation does to the optimizer's state (`node.moments`).
        self.moments = MomentRules()
        self.sample_count = reported_samples if reported_samples is not None else _dataset_size(train_loader)
        self.own_loader = own_loader
        # Without the peer's own test data, its label shares reweight the validation set (`node.owneval`).
        self.own_shares = (label_shares(train_loader) if self.classes is not None and val_loader is not None
                           and own_loader is None else None)
        # Set by a driver: ends local training at the next batch (a daemon asked to stop).
        self.stop_flag: threading.Event | None = None
        # The model (shared state, flat) after the last training that kept a finite loss; None before the first.
        self.last_good: torch.Tensor | None = None
        # Privacy mode dp_sgd: planned (and refused when its budget cannot cover the run) before the run starts.
        self.dpsgd = build_dpsgd(manifest, model, train_loader, self.loss_fn, local_epochs, local_steps, rounds,
                                 noise_seed)
        if self.dpsgd is not None and self.personal.mode != "none":
            # A personal head or model trains on the data outside DP-SGD's accountant.
            raise NodeConfigError(f"privacy mode dp_sgd cannot be combined with personalization {self.personal.mode}",
                                  "drop personalization from the manifest, or use privacy mode local_update")

    @property
    def sample_dp(self) -> SampleAccountant | None:
        """DP-SGD's accountant (privacy mode dp_sgd), which the sharing pipeline reports and checkpoints."""
        return self.dpsgd.accountant if self.dpsgd is not None else None

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now, read at every pass: a model the script moves later trains there."""
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(groups[0].get("lr", 0.0)) if groups else 0.0

    def train(self, round_: int, aggregator: Aggregator, sharing: SharingPipeline) -> TrainStats:
        """``local_epochs`` passes (more on little data: `node.localwork`), at most ``local_steps`` optimizer steps.

        A non-finite loss rolls the model back to the last good one (and clears the optimizer's state, which the
        bad steps fed) and trains the round once more; a second one, or one before any good round, is an error."""
        started = time.perf_counter()
        rolled_back_from: float | None = None
        self.moments.training_begins(self.optimizer, self.shared.parameters())
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
        self.moments.training_ended(stats.steps)
        if self.scheduler is not None:
            step_scheduler(self.scheduler, round_)
        self.personal.round_trained()
        stats.duration = time.perf_counter() - started
        stats.rolled_back_from = rolled_back_from
        stats.input_shape = self.input_shape.take()
        return stats

    def _batches(self, epochs: int) -> Iterator[tuple[int, Any, Any]]:
        """(epoch, inputs, targets) for ``epochs`` passes, ending after ``local_steps`` batches or at a stop."""
        if epochs <= 0:
            return
        steps = 0
        device = self.device  # once a pass: finding it walks the model's parameters
        for epoch in range(epochs):
            for batch in self.train_loader:
                x, y = split_batch(batch, device)
                self.input_shape.see(x)
                yield epoch, x, y
                steps += 1
                if (self.local_steps is not None and steps >= self.local_steps) or (
                    self.stop_flag is not None and self.stop_flag.is_set()
                ):
                    return

    def _step(self, x: Any, y: Any, extra: Callable[[], torch.Tensor | None]) -> tuple[Any, float]:
        """The backward pass of one optimizer step on a batch; (outputs, loss). `_NonFiniteLoss` before a non-finite
        loss is stepped on."""
        drop_grads(self.optimizer)
        try:
            out = self.model(x)
            loss = self.loss_fn(out, y)
        except QuinkglError:
            raise
        except Exception as exc:  # the script's model or data: name the batch, not a traceback from torch
            raise batch_failed(exc, x, y, self.input_shape.expected, "training", _count(self.classes)) from exc
        term = extra()
        if term is not None:
            loss = loss + term
        value = loss.item()  # the one read of the loss: the finiteness check and the round's mean both use it
        if not math.isfinite(value):
            raise _NonFiniteLoss(value)
        loss.backward()
        return out, value

    def _train_pass(self, aggregator: Aggregator, sharing: SharingPipeline) -> TrainStats:
        """One round's training from the current model; `_NonFiniteLoss` before a non-finite loss is stepped on.

        FedRep trains its personal head first (backbone frozen), then the backbone (head frozen); only the
        backbone's training sees the aggregator's hooks and DP, as only it is shared."""
        started = time.perf_counter()
        model, shared, personal = self.model, self.shared, self.personal
        model.train()
        if self.dpsgd is not None:
            lr = self.lr()
            aggregator.begin_training(model, lr)
            return self._dpsgd_pass(self.dpsgd, aggregator, sharing, lr, started)
        self._head_pass()
        lr = self.lr()
        total_loss = 0.0
        correct = scored = seen = steps = samples_first_epoch = 0  # scored: samples whose outputs read as classes
        with personal.backbone_only():
            aggregator.begin_training(shared, lr)
            if sharing.dp.enabled:
                sharing.begin_training(flatten(shared))
            for epoch, x, y in self._batches(self.local_epochs):
                out, loss = self._step(x, y, lambda: aggregator.loss_term(shared))
                aggregator.after_backward(shared)
                personal.before_step()
                optimizer_step(self.optimizer)
                personal.after_step(x, y, self.loss_fn)
                n = _batch_len(y)
                total_loss += loss * n
                seen += n
                if epoch == 0:
                    samples_first_epoch += n
                hits = _correct(self.classes, map_outputs(out, torch.Tensor.detach), y)
                if hits is not None:
                    correct, scored = correct + hits, scored + n
                steps += 1
            aggregator.end_training(shared, steps, lr)
        if sharing.dp.enabled:
            noised = sharing.end_training(flatten(shared))  # clip + noise the round's update, keep it
            if noised is not None:
                load_flat(shared, noised)
        if self.sample_count <= 0:
            self.sample_count = samples_first_epoch
        return TrainStats(
            loss=total_loss / seen if seen else None,
            accuracy=correct / scored if scored else None,  # None, not 0.0, when no output read as class scores
            samples=self.sample_count or samples_first_epoch,
            steps=steps,
            duration=time.perf_counter() - started,
        )

    def _head_pass(self) -> None:
        """The personal head's passes with the rest of the model frozen (FedRep; none under the other modes)."""
        with self.personal.head_only():
            for _, x, y in self._batches(self.personal.head_epochs):
                self._step(x, y, lambda: None)
                optimizer_step(self.optimizer)

    def fit_head(self) -> float | None:
        """After the final merge: the personal head's passes on the merged backbone (FedRep, as the paper's last
        round does; nothing under the other modes), so that the head the peer keeps and serves fits the backbone it
        is served under: the merge moved that backbone after the head last trained. A non-finite loss puts the
        head back as it was and is returned; else None."""
        if not self.personal.head_epochs:
            return None
        before = flatten(self.model)
        self.model.train()
        try:
            self._head_pass()
        except _NonFiniteLoss as bad:
            load_flat(self.model, before)
            return bad.loss
        return None

    def _dpsgd_pass(self, engine: DpSgdTraining, aggregator: Aggregator, sharing: SharingPipeline, lr: float,
                    started: float) -> TrainStats:
        """DP-SGD steps (`node.dpsgd`); a budget that cannot afford one more step stops training and sharing."""
        if engine.accountant.exhausted:
            sharing.sharing_stopped = True
        result = PassResult() if sharing.sharing_stopped else engine.run_pass(
            self.model, self.optimizer, self.loss_fn, aggregator, self.stop_flag, self.classes or ClassReading(),
            self.input_shape.see)
        if result.nonfinite is not None:
            raise _NonFiniteLoss(result.nonfinite)
        aggregator.end_training(self.model, result.steps, lr)
        seen = result.seen
        return TrainStats(loss=result.loss_sum / seen if seen else None,
                          accuracy=result.correct / seen if seen and result.classified and self.classes is not None else None,
                          samples=self.sample_count, steps=result.steps, duration=time.perf_counter() - started)

    def evaluate(self, model: nn.Module | None = None) -> EvalStats | None:
        """Loss and accuracy of ``model`` (default: the shared one) on the validation loader, and of this peer's
        personal model (`Shared.personal_model`) on the validation set and on its own distribution: its own test
        data when the script gave some, else the validation set reweighted to its label shares
        (`quinkgl_cli.node.owneval`); None when there is neither validation nor own test data."""
        if self.val_loader is None and self.own_loader is None:
            return None
        started = time.perf_counter()
        served = self.shared if model is None else model
        personal = self.personal.personal_model(served)  # first: FedRep puts this peer's head under ``served``
        loss = accuracy = personal_accuracy = own = None
        if self.val_loader is not None:
            loss, accuracy, hits = self._eval_pass(served, self.val_loader)
            if self.personal.separate:
                _, personal_accuracy, hits = self._eval_pass(personal, self.val_loader)
            own = weighted_accuracy(*hits, self.own_shares) if hits is not None and self.own_shares else None
        if self.own_loader is not None:
            _, own, _ = self._eval_pass(personal, self.own_loader)
        return EvalStats(loss, accuracy, time.perf_counter() - started, own, personal_accuracy, self.personal.mixing())

    def _eval_pass(self, model: nn.Module, loader: Iterable[Any]) -> tuple[float | None, float | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """(loss, accuracy, per-class hits) of ``model`` on ``loader``."""
        model.eval()
        total = 0.0
        correct = scored = seen = 0
        per_class: tuple[torch.Tensor, torch.Tensor] | None = None
        device = self.device
        with torch.no_grad():
            for batch in loader:
                x, y = split_batch(batch, device)
                try:
                    out = model(x)
                    n = _batch_len(y)
                    total += float(self.loss_fn(out, y)) * n
                except QuinkglError:
                    raise
                except Exception as exc:
                    raise batch_failed(exc, x, y, self.input_shape.expected, "evaluation", _count(self.classes)) from exc
                hits = _correct(self.classes, out, y)
                if hits is not None:
                    correct, scored = correct + hits, scored + n
                seen += n
                by_class = class_hits(out, y, self.classes) if self.own_shares and self.classes else None
                if by_class is not None:
                    per_class = by_class if per_class is None else _add_hits(per_class, by_class)
        return (total / seen if seen else None, correct / scored if scored else None, per_class)

    def model_replaced(self, trusted: bool = True) -> None:
        """An aggregation loaded a new model: the optimizer's state starts anew (``fresh_optimizer``), or Adam's
        second moments are floored and, after a ``trusted`` aggregation (nothing refused or clipped), SGD's momentum
        buffers take in the round's movement (`node.moments`)."""
        if self.fresh_optimizer:
            self.optimizer.state.clear()
        else:
            self.moments.model_replaced(self.optimizer, self.shared.parameters(), trusted)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model, optimizer and personalization as (tensors, JSON): ``model.*``, ``optim.<param>.<key>`` and
        ``personal.*`` tensors; ``optimizer`` (param groups, non-tensor state), ``scheduler`` (when the script has
        one: its type and state, `node.lrschedule`) and ``personal`` JSON. CPU tensors are views of the live state,
        not copies."""
        tensors = {f"model.{name}": t.detach().cpu().contiguous() for name, t in self.model.state_dict().items()}
        opt_tensors, optimizer = optimizer_state(self.optimizer, "optim.")
        personal_tensors, personal = self.personal.state_dict()
        meta = {"optimizer": optimizer, "personal": personal}
        if self.scheduler is not None:
            meta["scheduler"] = scheduler_state(self.scheduler)
        return {**tensors, **opt_tensors, **personal_tensors}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], sample_count: int) -> None:
        """Restore what `state_dict` saved (``meta`` holds its JSON); the model and optimizer must be the same shapes."""
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model (missing {len(missing)}, unexpected {len(unexpected)} entries)")
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], "optim.")
        load_scheduler_state(self.scheduler, meta.get("scheduler"))
        self.personal.load_state_dict(tensors, meta.get("personal"))
        if sample_count > 0 and self.sample_count <= 0:
            self.sample_count = sample_count


def _diverged(loss: float, round_: int) -> NodeConfigError:
    return NodeConfigError(f"training loss became {loss} in round {round_}", "lower the learning rate in build_optimizer")


def _dataset_size(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        try:
            return int(len(dataset))
        except TypeError:
            return 0
    return 0


def split_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """(inputs, targets) of a batch, on the model's device (loaders yield CPU tensors; a script may build a GPU model)."""
    x, y = batch_parts(batch)
    if device.type != "cpu":
        x = x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        y = y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else y
    return x, y


def _add_hits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(a[0].numel(), b[0].numel())
    return (_padded(a[0], n) + _padded(b[0], n), _padded(a[1], n) + _padded(b[1], n))


def _padded(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, n - t.numel()))


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """The script's optimizer's step; what it raises (Adam on an ``nn.Embedding(sparse=True)``'s gradients) as one
    line naming it, not a traceback from torch."""
    try:
        optimizer.step()
    except QuinkglError:
        raise
    except Exception as exc:
        raise NodeConfigError(f"the {type(optimizer).__name__} optimizer from build_optimizer failed at its step: "
                              f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                              "build an optimizer that takes this model's gradients (SparseAdam for sparse "
                              "embeddings)") from exc


def drop_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``. Torch's own only sets each parameter's gradient to None, inside a
    profiler range and a compiler guard that cost 20 times that (3% of a simulated peer's round); an optimizer that
    overrides it keeps its own."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def _batch_len(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 1


def _count(classes: ClassReading | None) -> int | None:
    return classes.count if classes is not None else None


def _correct(classes: ClassReading | None, out: torch.Tensor, y: torch.Tensor) -> int | None:
    pairs = classes.pairs(out, y) if classes is not None else None
    return None if pairs is None else int((pairs[0] == pairs[1]).sum())
