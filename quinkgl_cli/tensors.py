"""Flat views of a model's floating-point state: the unit that strategies, compression and the wire work on; and
`map_outputs`, for a model's outputs whatever their structure."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def shared_specs(model: nn.Module) -> list[TensorSpec]:
    """The state entries peers exchange: every floating-point parameter and buffer, in state_dict order.

    Integer buffers (e.g. BatchNorm's num_batches_tracked) stay local: averaging them means nothing.
    """
    return [
        TensorSpec(name, tuple(t.shape), t.dtype)
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    ]


def float_buffers(model: nn.Module) -> list[str]:
    """Shared state entries that are not parameters: BatchNorm's running statistics and the like."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and name not in params]


def trainable_mask(model: nn.Module) -> torch.Tensor | None:
    """A bool vector over ``flatten(model)``: True on entries of parameters that train (``requires_grad``).
    None when every shared entry trains (the common case, no mask needed)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    parts = []
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            param = params.get(name)
            parts.append(torch.full((t.numel(),), param is not None and param.requires_grad, dtype=torch.bool))
    mask = torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)
    return None if bool(mask.all()) else mask


def still_mask(model: nn.Module) -> torch.Tensor | None:
    """A bool vector over ``flatten(model)``: True on entries no optimizer step moves (floating-point buffers such
    as BatchNorm's running statistics, frozen parameters). None when every shared entry trains."""
    if all(p.requires_grad for p in model.parameters()) and not any(b.is_floating_point() for b in model.buffers()):
        return None  # the common case, asked once a round: no mask to build
    mask = trainable_mask(model)
    return None if mask is None else ~mask


def is_running_variance(name: str) -> bool:
    """Whether the state entry ``name`` is a running variance, as BatchNorm's and InstanceNorm's are named."""
    return name.rsplit(".", 1)[-1] == "running_var"


def variance_mask(model: nn.Module) -> torch.Tensor | None:
    """A bool vector over ``flatten(model)``: True on running variances (`is_running_variance`). None when the
    model keeps none."""
    parts = []
    found = False
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            is_var = is_running_variance(name)
            found = found or is_var
            parts.append(torch.full((t.numel(),), is_var, dtype=torch.bool))
    return torch.cat(parts) if found else None


def flatten(model: nn.Module) -> torch.Tensor:
    """One float32 CPU vector of the shared state (a copy), wherever the model lives.

    Everything downstream (aggregation, DP noise, the codec, the wire) works on CPU tensors: a GPU model's vector
    mixed with CPU noise or peers' CPU updates would fail, so the copy to the host happens here, once per call.
    """
    state = model.state_dict(keep_vars=True)  # detached below: state_dict's own detach of every entry is not needed
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in state.values() if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.empty(0)


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Write ``flat`` (on any device) back into the model's shared state in place, on the model's devices."""
    state = model.state_dict(keep_vars=True)  # written under no_grad, as the detached entries would be
    offset = 0
    with torch.no_grad():
        for t in state.values():
            if not t.is_floating_point():
                continue
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model needs {offset}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A finite sum proves it (any NaN or Inf makes the sum NaN or Inf; a float32 sum of
    finite values overflows only past ~3e38) at a thirtieth of the cost of ``isfinite(t).all()``, which runs only
    to confirm a non-finite sum. The sum is read as a Python float: ``torch.isfinite`` of the 0-dim sum is several
    kernels and cost three times the sum itself."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def map_outputs(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to each tensor of a model's outputs: one tensor, or a several-headed model's tuple, list or
    dict of them (nested too); anything else is left as it is."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(map_outputs(t, fn) for t in out)
    if isinstance(out, Mapping):
        return {k: map_outputs(t, fn) for k, t in out.items()}
    return out
