"""DP-SGD local training (privacy mode ``dp_sgd``): the trainer's pass when the manifest asks for it.

Owns the plan and the accountant of one peer. Before the run (`build_dpsgd`, called when the trainer is built,
so `run`, `simulate` and the demo refuse alike): the model's layers are checked, the sampling rate is
q = the training loader's batch size / the training-set size N, a round takes ``local_epochs`` * ceil(1/q) steps
(at most ``local_steps``), and the noise multiplier is the smallest that keeps rounds * steps within the
manifest's total epsilon (`strategies.dp_accountant.plan_noise_multiplier`); a run it cannot cover is refused
with the numbers (exit 7). During the run (`DpSgdTraining.run_pass`): each step draws a Poisson batch (every
example with probability q, from a generator seeded by the operating system unless the simulator fixes it),
takes per-example gradients, clips and noises them (`strategies.dpsgd`), hands the noisy mean to the optimizer
and charges the step to the accountant; once the next step would overspend, training stops and the node stops
sharing (`SharingPipeline.sharing_stopped`).
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from quinkgl_cli.batches import batch_parts
from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import DpSgdSpec, Manifest
from quinkgl_cli.node.classes import ClassReading
from quinkgl_cli.strategies.base import Aggregator
from quinkgl_cli.strategies.dp_accountant import BudgetTooSmall, SampleAccountant, plan_noise_multiplier
from quinkgl_cli.strategies.dpsgd import LossFn, clip_and_sum, noisy_mean, per_sample_grads, unsupported_layers


@dataclass
class PassResult:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    classified: bool = False
    nonfinite: float | None = None  # the loss that stopped the pass before its step was taken


@dataclass(frozen=True)
class DpSgdPlan:
    rounds: int
    steps_per_round: int
    sampling_rate: float
    expected_batch: float
    noise_multiplier: float


def build_dpsgd(manifest: Manifest, model: nn.Module, train_loader: Iterable[Any], loss_fn: LossFn,
                local_epochs: int, local_steps: int | None, rounds: int | None,
                noise_seed: int | None) -> DpSgdTraining | None:
    """The DP-SGD trainer of this peer, None unless the manifest's privacy mode is dp_sgd. Refuses what DP-SGD
    cannot cover (NodeConfigError, exit 7)."""
    spec = manifest.privacy.dp_sgd
    if manifest.privacy.mode != "dp_sgd" or spec is None:
        return None
    bad = unsupported_layers(model)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NodeConfigError(
            f"DP-SGD cannot train this model: {', '.join(bad[:3])}{more} keep statistics across examples",
            "use GroupNorm or LayerNorm instead of BatchNorm (as Opacus requires), register constant buffers with "
            "persistent=False, or choose privacy mode local_update")
    if rounds is None:
        raise NodeConfigError("DP-SGD spreads its budget over a known number of rounds, and this run has none",
                              "give --rounds (or create the manifest with --round-limit)")
    dataset = getattr(train_loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        raise NodeConfigError("DP-SGD samples its own batches and needs the training loader's map-style dataset",
                              "return a torch DataLoader over a non-empty Dataset with __len__ and __getitem__")
    size = len(dataset)
    batch = int(getattr(train_loader, "batch_size", None) or 1)
    rate = min(1.0, batch / size)
    steps = local_epochs * math.ceil(1.0 / rate)
    if local_steps is not None:
        steps = min(steps, local_steps)
    try:
        sigma = plan_noise_multiplier(spec.epsilon, spec.delta, rate, rounds * steps, spec.max_noise_multiplier)
    except BudgetTooSmall as exc:
        raise NodeConfigError(
            f"DP-SGD budget cannot cover the run: {exc} ({rounds} rounds x {steps} steps, batch {batch} of {size})",
            "raise dp_sgd.epsilon or max_noise_multiplier in the manifest, or lower --rounds, local_epochs or "
            "local_steps") from exc
    plan = DpSgdPlan(rounds, steps, rate, rate * size, sigma)
    collate = getattr(train_loader, "collate_fn", None) or default_collate
    engine = DpSgdTraining(spec, plan, dataset, collate, noise_seed)
    engine.probe(model, loss_fn)
    return engine


class DpSgdTraining:
    """One peer's DP-SGD: Poisson batches, clipped and noised per-example gradients, the accountant."""

    def __init__(self, spec: DpSgdSpec, plan: DpSgdPlan, dataset: Any, collate: Any, noise_seed: int | None) -> None:
        self.spec = spec
        self.plan = plan
        self.dataset = dataset
        self.collate = collate
        self.accountant = SampleAccountant(spec.epsilon, spec.delta, plan.sampling_rate, plan.noise_multiplier)
        # Noise and sampling others could predict protect nothing: the OS's secure source unless the simulator asks.
        self._gen = torch.Generator().manual_seed(noise_seed if noise_seed is not None else secrets.randbits(63))

    def probe(self, model: nn.Module, loss_fn: LossFn) -> None:
        """One per-example gradient of two examples, at start-up: a model torch.func cannot take apart is refused
        before the run, not in its first round."""
        x, y = self._batch(torch.arange(min(2, len(self.dataset))))
        device = _device(model)
        was_training = model.training
        model.train()
        try:
            per_sample_grads(model, loss_fn, x.to(device), y.to(device))
        except Exception as exc:
            raise NodeConfigError(f"DP-SGD cannot take per-example gradients of this model: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                  "the model must work on a batch of one example and keep no state across calls") from exc
        finally:
            model.train(was_training)

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.collate([self.dataset[int(i)] for i in idx])
        x, y = batch_parts(batch)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise NodeConfigError("DP-SGD needs examples that collate to (inputs, targets) tensors",
                                  "make the training dataset yield (x, y) tensor pairs")
        return x, y

    def run_pass(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, aggregator: Aggregator,
                 stop_flag: threading.Event | None, classes: ClassReading,
                 see_inputs: Callable[[torch.Tensor], None]) -> PassResult:
        """Up to one round's planned steps; fewer when the budget or a stop request ends it; accuracy read by
        ``classes``; each batch's inputs shown to ``see_inputs`` (the trainer's input-shape check, as the normal
        pass does). Every step taken, an empty Poisson batch included, is charged to the accountant."""
        result = PassResult()
        device = _device(model)
        size = len(self.dataset)
        for _ in range(self.plan.steps_per_round):
            if self.accountant.exhausted or (stop_flag is not None and stop_flag.is_set()):
                break
            idx = torch.nonzero(torch.rand(size, generator=self._gen) < self.plan.sampling_rate).flatten()
            optimizer.zero_grad(set_to_none=True)
            params = {k: p for k, p in model.named_parameters() if p.requires_grad}
            if idx.numel():
                x, y = self._batch(idx)
                see_inputs(x)
                x, y = x.to(device), y.to(device)
                ps = per_sample_grads(model, loss_fn, x, y)
                loss = float(ps.losses.mean())
                if not math.isfinite(loss):
                    self.accountant.spend()  # the step touched the data: charged though nothing is released
                    result.nonfinite = loss
                    return result
                summed, _ = clip_and_sum(ps.grads, self.spec.clip_norm)
                _tally(result, ps.losses, ps.outputs, y, classes)
            else:
                summed = {k: torch.zeros_like(p) for k, p in params.items()}
            noisy = noisy_mean(summed, self.spec.clip_norm, self.accountant.noise_multiplier, self.plan.expected_batch,
                               self._gen)
            self.accountant.spend()
            _add_data_free_term(model, aggregator)  # FedProx's proximal term: a function of the weights only
            for k, p in params.items():
                p.grad = noisy[k] if p.grad is None else p.grad + noisy[k]
            aggregator.after_backward(model)
            optimizer.step()
            result.steps += 1
        return result


def _add_data_free_term(model: nn.Module, aggregator: Aggregator) -> None:
    extra = aggregator.loss_term(model)
    if extra is not None:
        extra.backward()


def _tally(result: PassResult, losses: torch.Tensor, outputs: Any, y: torch.Tensor,
           classes: ClassReading) -> None:
    n = int(losses.shape[0])
    result.loss_sum += float(losses.sum())
    result.seen += n
    pairs = classes.pairs(outputs, y)
    if pairs is not None:
        result.classified = True
        result.correct += int((pairs[0] == pairs[1]).sum())


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
