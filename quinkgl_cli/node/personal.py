"""Personalized models (the manifest's ``personalization``): which part of a peer's model is shared, and the model
the peer keeps for itself and serves to its own users.

One policy per mode, each owning its state and its ``state_dict``; the `Trainer` calls them around local training
and evaluation, and the node hands their ``shared`` module to everything that flattens, sends, aggregates, noises,
compresses or serves the shared model:

- `Shared` (``none``): the whole model is shared and is the peer's model.
- `FedRep` (Collins et al. 2021): the model splits by parameter name into a shared backbone and a personal head.
  ``shared`` is a `SharedPart`, a view whose state holds only the backbone, so the head is never flattened, so it
  never reaches the wire, an aggregator, DP or the codec; each round trains the head first (``head_epochs`` passes,
  backbone frozen), then the backbone (head frozen) with the aggregator's hooks and DP; after the final merge the
  head trains once more, on the merged backbone (`Trainer.fit_head`, the paper's last round). The head is, in order:
  the manifest's ``head_prefixes``, else the prefixes in the model's ``quinkgl_head`` attribute (set by the peer
  script's ``build_model``), else the last layer that has parameters.
- `APFL` (Deng et al. 2020): a local model v beside the shared model w. w trains as usual and alone is shared;
  after each of w's steps v takes one on the loss of the mixture alpha*v + (1-alpha)*w on the same batch, with w
  as that batch found it (before its step, as in the paper's algorithm) and held fixed, so v's gradient is alpha
  times the mixture's; alpha takes one step of its own gradient, clipped to [0, 1]. The peer's
  personal model is alpha*v + (1-alpha)*w, with w the shared model the peer serves.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.personalization import PersonalizationSpec
from quinkgl_cli.node.lrschedule import Training, load_scheduler_state, scheduler_state
from quinkgl_cli.node.state import load_optimizer_state, optimizer_state

HEAD_ATTRIBUTE = "quinkgl_head"  # a model's own choice of head prefixes (FedRep), below the manifest's
PREFIX = "personal."
LOCAL_PREFIX = f"{PREFIX}local."  # APFL's local model in a checkpoint
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SharedPart(nn.Module):
    """The backbone of ``whole`` as a module: its state and parameters leave out the ``head`` entries; calling it
    runs the whole model. Writing into its state writes into the whole model's tensors (they are the same)."""

    whole: nn.Module
    head: frozenset[str]

    def __init__(self, whole: nn.Module, head: frozenset[str]) -> None:
        super().__init__()
        # Not registered as a submodule: the whole model's entries must not appear in this module's state.
        object.__setattr__(self, "whole", whole)
        object.__setattr__(self, "head", head)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.whole(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        full = self.whole.state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if k not in self.head)

    def named_parameters(self, prefix: str = "", recurse: bool = True,  # type: ignore[override]
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.whole.named_parameters(prefix, recurse, remove_duplicate):
            if name not in self.head:
                yield name, param

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        return (param for _, param in self.named_parameters(recurse=recurse))

    def train(self, mode: bool = True) -> SharedPart:
        self.whole.train(mode)
        return self


@contextmanager
def _frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` do not train inside the block (no gradient, so the optimizer skips them); their flags come back."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class Shared:
    """``none``: the whole model is shared and is what the peer serves. The base of the other policies."""

    mode = "none"
    head_epochs = 0
    separate = False  # whether the personal model differs from the shared model the peer serves

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.shared: nn.Module = model

    def head_only(self) -> AbstractContextManager[None]:
        return nullcontext()

    def backbone_only(self) -> AbstractContextManager[None]:
        return nullcontext()

    def before_step(self) -> None:
        """Called before each optimizer step of the shared model: its weights are still the ones the batch saw."""

    def after_step(self, x: Any, y: Any, loss_fn: LossFn) -> None:
        """Called after each optimizer step of the shared model, with that step's batch."""

    def round_trained(self) -> None:
        """Called once per round after local training, when the shared model's scheduler steps."""

    def personal_model(self, served: nn.Module) -> nn.Module:
        """The model this peer serves its own users, given the shared model it serves (``served``)."""
        return served

    def mixing(self) -> float | None:
        """APFL's mixing weight alpha (reported each round); None for the other modes."""
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"mode": self.mode}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> None:
        saved = (meta or {}).get("mode", "none")
        if saved != self.mode:
            raise ValueError(f"checkpoint holds personalization {saved!r}, the manifest says {self.mode!r}")


def _matches(name: str, prefix: str) -> bool:
    return name.startswith(prefix) if prefix.endswith(".") else name == prefix or name.startswith(prefix + ".")


def head_prefixes(model: nn.Module, spec: PersonalizationSpec) -> tuple[str, ...]:
    """The manifest's prefixes, else the model's ``quinkgl_head``, else the last layer with parameters."""
    if spec.head_prefixes:
        return spec.head_prefixes
    own = getattr(model, HEAD_ATTRIBUTE, None)
    if own:
        if isinstance(own, str):
            return (own,)
        if isinstance(own, (list, tuple)) and all(isinstance(p, str) and p for p in own):
            return tuple(own)
        raise NodeConfigError(f"the model's {HEAD_ATTRIBUTE} must be a parameter-name prefix or a list of them",
                              f"set model.{HEAD_ATTRIBUTE} = ('fc3',) in build_model, or head_prefixes in the manifest")
    names = [name for name, _ in model.named_parameters()]
    if not names:
        raise NodeConfigError("FedRep needs a model with parameters", "use personalization none")
    last = names[-1]
    return (last.rsplit(".", 1)[0] + "." if "." in last else last,)


class FedRep(Shared):
    mode = "fedrep"

    def __init__(self, model: nn.Module, spec: PersonalizationSpec) -> None:
        super().__init__(model)
        prefixes = head_prefixes(model, spec)
        state = model.state_dict()
        head = frozenset(k for k in state if any(_matches(k, p) for p in prefixes))
        floats = [k for k, t in state.items() if t.is_floating_point()]
        hint = "set head_prefixes in the manifest (--personalization-param head_prefixes=NAME) to a part of the model"
        if not head:
            raise NodeConfigError(f"FedRep head prefixes {', '.join(prefixes)} match none of the model's entries", hint)
        if all(k in head for k in floats):
            raise NodeConfigError(f"FedRep head prefixes {', '.join(prefixes)} cover the whole model: nothing left to share",
                                  hint)
        storage = {t.untyped_storage().data_ptr() for k, t in state.items() if k not in head and t.numel()}
        tied = sorted(k for k in head if state[k].numel() and state[k].untyped_storage().data_ptr() in storage)
        if tied:
            raise NodeConfigError(f"FedRep head entry {tied[0]} shares its tensor with the backbone (tied weights): "
                                  "it would leave the device with the backbone", hint)
        self.head_epochs = spec.head_epochs
        self.head_names = head
        self.shared = SharedPart(model, head)
        self._head = [p for n, p in model.named_parameters() if n in head]
        self._backbone = [p for n, p in model.named_parameters() if n not in head]

    def head_only(self) -> AbstractContextManager[None]:
        return _frozen(self._backbone)

    def backbone_only(self) -> AbstractContextManager[None]:
        return _frozen(self._head)

    def personal_model(self, served: nn.Module) -> nn.Module:
        """The served backbone under this peer's own head (``served`` is a `SharedPart` or its copy)."""
        whole = served.whole if isinstance(served, SharedPart) else served
        if whole is not self.model:
            own = self.model.state_dict()
            with torch.no_grad():
                for name, t in whole.state_dict().items():
                    if name in self.head_names:
                        t.copy_(own[name])
        return whole


class APFL(Shared):
    mode = "apfl"
    separate = True

    def __init__(self, model: nn.Module, spec: PersonalizationSpec,
                 build_optimizer: Callable[[nn.Module], Training]) -> None:
        super().__init__(model)
        self.local = copy.deepcopy(model)  # v starts where w does (the paper's v0 = w0)
        # v's optimizer and scheduler come from the script's hook, as w's do; the scheduler steps with w's.
        self.optimizer, self.scheduler = build_optimizer(self.local)
        self.alpha = float(spec.alpha)
        self.alpha_lr = float(spec.alpha_lr)
        self._mixed: nn.Module | None = None
        self._w_before: dict[str, torch.Tensor] | None = None

    def before_step(self) -> None:
        self._w_before = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def after_step(self, x: Any, y: Any, loss_fn: LossFn) -> None:
        first = next(iter(self.local.parameters()))
        alpha = torch.tensor(self.alpha, device=first.device, dtype=first.dtype, requires_grad=True)
        # The paper's step: v and alpha move from the same iterate as w, the w this batch's forward pass used.
        # Mixing in the w that has just stepped on this very batch favours w in alpha's gradient (on label-skewed
        # digits alpha fell from 0.5 to 0.3, and to 0.04 with alpha_lr 0.1, below what serves the peer best).
        w = self._w_before if self._w_before is not None else {n: p.detach() for n, p in self.model.named_parameters()}
        self._w_before = None
        mixed = {n: alpha * v + (1.0 - alpha) * w[n] for n, v in self.local.named_parameters()}
        self.local.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(functional_call(self.local, mixed, (x,)), y)
        if not torch.isfinite(loss):
            return  # the shared model's own step decides about divergence (rollback); v skips this batch
        loss.backward()
        self.optimizer.step()
        if alpha.grad is not None and self.alpha_lr > 0.0:
            self.alpha = min(1.0, max(0.0, self.alpha - self.alpha_lr * float(alpha.grad)))

    def personal_model(self, served: nn.Module) -> nn.Module:
        if self._mixed is None:
            self._mixed = copy.deepcopy(self.local)
        w = served.state_dict()
        params = {n for n, _ in self.local.named_parameters()}
        with torch.no_grad():
            mixed = self._mixed.state_dict()
            for name, v in self.local.state_dict().items():
                if name in params:
                    mixed[name].copy_(self.alpha * v + (1.0 - self.alpha) * w[name].to(v.dtype))
                else:
                    mixed[name].copy_(v)  # buffers (running statistics) are the local model's
        return self._mixed

    def round_trained(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def mixing(self) -> float | None:
        return self.alpha

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``personal.local.*`` (v) and ``personal.optim.*`` tensors; alpha, v's optimizer groups and its scheduler
        (if any) in JSON."""
        tensors = {f"{LOCAL_PREFIX}{k}": t.detach().cpu().contiguous() for k, t in self.local.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.optimizer, f"{PREFIX}optim.")
        tensors.update(opt_tensors)
        meta = {"mode": self.mode, "alpha": self.alpha, "optimizer": opt_meta}
        if self.scheduler is not None:
            meta["scheduler"] = scheduler_state(self.scheduler)
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> None:
        super().load_state_dict(tensors, meta)
        meta = meta or {}
        alpha = float(meta["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"checkpoint APFL alpha {alpha} is outside [0, 1]")
        local = {k[len(LOCAL_PREFIX):]: v for k, v in tensors.items() if k.startswith(LOCAL_PREFIX)}
        missing, unexpected = self.local.load_state_dict(local, strict=False)
        if missing or unexpected or not all(bool(torch.isfinite(t).all()) for t in local.values() if t.is_floating_point()):
            raise ValueError("checkpoint APFL local model does not fit the model or is not finite")
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], f"{PREFIX}optim.")
        load_scheduler_state(self.scheduler, meta.get("scheduler"))
        self.alpha = alpha


def build_personal(spec: PersonalizationSpec, model: nn.Module,
                   build_optimizer: Callable[[nn.Module], Training]) -> Shared:
    """The policy the manifest names, for ``model``; refuses a model it cannot split (`NodeConfigError`)."""
    if spec.mode == "fedrep":
        return FedRep(model, spec)
    if spec.mode == "apfl":
        return APFL(model, spec, build_optimizer)
    return Shared(model)
