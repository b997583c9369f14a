"""What a peer script's ``build_optimizer`` may return: an optimizer, or ``(optimizer, scheduler)`` with a torch
learning-rate scheduler of that optimizer, which the trainer steps once per round after local training.

Owns the check of that return value (a one-line `NodeConfigError`, exit 7, naming what came back) and the
scheduler's part of a checkpoint: its type and its ``state_dict`` as JSON, never pickled. Torch's own state leaves
out a `LambdaLR`'s (or `MultiplicativeLR`'s) plain functions, as ``torch.save`` of it does: the script builds them
again at every start, and the round count they are called with is in the state. A scheduler whose state holds
anything JSON cannot carry (a stateful callable object's attributes of other types) is refused when the node is
built rather than checkpointed without it; so is `ReduceLROnPlateau`, which needs a metric at each step. So is an
optimizer whose ``step`` requires a closure (`torch.optim.LBFGS`): it re-evaluates the loss itself, several times a
step, where the trainer steps once per batch after its own backward pass (and the aggregator's and DP's hooks).

An optimizer built on part of the model (``SparseAdam`` on an embedding only) leaves the other trainable
parameters at their initial values, which gossip then averages as they are: not an error (a script may mean it),
but said once when the node is built (`left_out`), as no metric would show why those layers never learn.

A scheduler that raises at its round's step (a `OneCycleLR` stepped past its ``total_steps``) stops the node with
one line naming it and the round (`step_scheduler`); a `OneCycleLR` too short for the run's known round count is
refused when the node is built (`check_schedule_length`).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from quinkgl_cli.errors import NodeConfigError

RETURN_HINT = "return an optimizer built on model.parameters(), or (optimizer, scheduler) with a torch.optim.lr_scheduler of it"


class Training(NamedTuple):
    """An optimizer and the learning-rate scheduler that steps it once per round (None: the rate stays)."""

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None = None


def check_training(value: Any, where: str) -> Training:
    """``value`` (what ``build_optimizer`` returned) as a `Training`, or a one-line `NodeConfigError` naming it."""
    if isinstance(value, torch.optim.Optimizer):
        _check_steps_without_closure(value, where)
        return Training(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.optim.Optimizer):
        optimizer, scheduler = value
        _check_steps_without_closure(optimizer, where)
        if scheduler is None:
            return Training(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise NodeConfigError(f"{where} returned a ReduceLROnPlateau scheduler, which needs a metric at each step;"
                                  " quinkgl steps the scheduler once per round without one",
                                  "use a scheduler that steps by round count (StepLR, CosineAnnealingLR, LambdaLR, ...)")
        if not isinstance(scheduler, LRScheduler):
            raise NodeConfigError(f"{where} returned ({type(optimizer).__name__}, {type(scheduler).__name__}): the "
                                  "second item is not a torch.optim.lr_scheduler scheduler", RETURN_HINT)
        if scheduler.optimizer is not optimizer:
            raise NodeConfigError(f"{where} returned a {type(scheduler).__name__} of another optimizer than the "
                                  f"{type(optimizer).__name__} it returned", "build the scheduler on the optimizer you return")
        scheduler_state(scheduler, where)  # refused now, not at the first checkpoint
        return Training(optimizer, scheduler)
    raise NodeConfigError(f"{where} returned {_describe(value)}, not an optimizer or (optimizer, scheduler)", RETURN_HINT)


def left_out(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The fields of an ``optimizer-leaves-out`` warning when ``optimizer`` steps none of some of ``model``'s
    trainable parameters (their count, the first names and a hint); None when it steps them all."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in stepped]
    if not names:
        return None
    return {"params": len(names), "names": names[:4],
            "hint": "build_optimizer's optimizer does not step these: they keep their initial values (set "
                    "requires_grad=False on what is frozen on purpose, or give the optimizer model.parameters())"}


def _check_steps_without_closure(optimizer: torch.optim.Optimizer, where: str) -> None:
    """Refuse an optimizer whose ``step`` cannot be called without a closure (it failed at the first batch with
    torch's `missing 1 required positional argument: 'closure'`, after the dry run passed)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step torch cannot describe: let it run
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise NodeConfigError(f"{where} returned {type(optimizer).__name__}, whose step needs a closure that "
                              "re-evaluates the loss; quinkgl steps the optimizer once per batch without one",
                              "use an optimizer that steps on the gradients of one backward pass (SGD, Adam, ...)")


def check_schedule_length(scheduler: LRScheduler | None, rounds: int | None) -> LRScheduler | None:
    """``scheduler``; a `OneCycleLR` whose ``total_steps`` are fewer than the run's rounds is refused (it steps
    once per round and raises past its last step)."""
    if isinstance(scheduler, OneCycleLR) and rounds is not None and scheduler.total_steps < rounds:
        raise NodeConfigError(f"build_optimizer returned a OneCycleLR of total_steps={scheduler.total_steps}, fewer "
                              f"than the run's {rounds} rounds: quinkgl steps the scheduler once per round",
                              f"build it with total_steps={rounds} (or epochs={rounds}, steps_per_epoch=1)")
    return scheduler


def step_scheduler(scheduler: LRScheduler, round_: int) -> None:
    """The scheduler's step after round ``round_``'s training; what it raises as a one-line `NodeConfigError`."""
    try:
        scheduler.step()
    except Exception as exc:  # the script's scheduler: name it and the round, not a traceback from torch
        raise NodeConfigError(f"the {type(scheduler).__name__} scheduler from build_optimizer failed at its step after "
                              f"round {round_}: {type(exc).__name__}: {exc}",
                              "build the scheduler for one step per round over the whole run") from exc


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__


def scheduler_state(scheduler: LRScheduler, where: str = "build_optimizer") -> dict[str, Any]:
    """The scheduler's checkpoint entry: its type and its state as JSON; `NodeConfigError` when the state holds a
    value JSON cannot carry (it would otherwise be lost on resume)."""
    return {"type": type(scheduler).__name__, "state": _json(scheduler.state_dict(), type(scheduler).__name__, where)}


def load_scheduler_state(scheduler: LRScheduler | None, saved: dict[str, Any] | None) -> None:
    """Restore what `scheduler_state` saved; ValueError when the checkpoint and the script disagree about it."""
    if scheduler is None and saved is None:
        return
    if saved is None:
        raise ValueError(f"the checkpoint holds no learning-rate scheduler and build_optimizer returns a "
                         f"{type(scheduler).__name__}")
    if scheduler is None:
        raise ValueError(f"the checkpoint holds a {saved.get('type')} scheduler's state and build_optimizer returns none")
    if saved.get("type") != type(scheduler).__name__:
        raise ValueError(f"the checkpoint holds a {saved.get('type')} scheduler's state, build_optimizer returns a "
                         f"{type(scheduler).__name__}")
    scheduler.load_state_dict(saved["state"])


def _json(value: Any, kind: str, where: str, path: str = "") -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json(v, kind, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json(v, kind, where, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise NodeConfigError(f"{where}: the {kind} scheduler's state {path or 'value'} is a {type(value).__name__}, which "
                          "a checkpoint cannot hold without pickle (its resumed run would lose it)",
                          "use a torch scheduler with plain settings, or a LambdaLR with a plain function")
