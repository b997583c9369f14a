"""The DP-SGD mechanism of one step: per-example gradients, per-example clipping, Gaussian noise on their sum.

Per-example gradients come from ``torch.func``: ``vmap`` over ``grad`` of the loss of one example, the model
called through ``functional_call`` on a batch of one. Each example is thus computed alone, so no layer can mix
examples inside a step; what remains unsafe are layers that keep statistics of the data in buffers (BatchNorm's
running mean and variance, InstanceNorm with running statistics): they are refused (`unsupported_layers`), as
Opacus refuses them, because those buffers would be shared without noise.

Why torch.func and not Opacus: per-example gradients for any module torch can differentiate, with no wrapping of
the model or optimizer, no extra dependency, and the accountant already in use (`strategies.dp_accountant`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from quinkgl_cli.tensors import float_buffers, map_outputs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NORM_EPS = 1e-6


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of modules DP-SGD cannot cover: batch normalization (statistics across examples, running buffers),
    and any module that keeps floating-point buffers of the data."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or 'model'} ({type(module).__name__})")
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            found.append(f"{name or 'model'} ({type(module).__name__} with track_running_stats)")
    if not found:
        found = [f"buffer {b}" for b in float_buffers(model)]
    return found


@dataclass
class PerSample:
    """Per-example gradients of one batch (name -> tensor with a leading batch dimension) and losses / outputs."""

    grads: dict[str, torch.Tensor]
    losses: torch.Tensor
    outputs: Any  # the model's: a tensor, or a several-headed model's tuple, list or dict of them


def per_sample_grads(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> PerSample:
    """The gradient of each example's loss with respect to the trainable parameters, the model left untouched."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = loss_fn(out, yi.unsqueeze(0))
        # A batch of one's outputs, cut from the graph, without the batch dimension: vmap stacks them back.
        return loss, (loss.detach(), map_outputs(out, lambda t: t.detach().squeeze(0)))

    grads, (losses, outputs) = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return PerSample(grads=grads, losses=losses, outputs=outputs)


def clip_and_sum(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's whole gradient scaled to L2 norm at most ``clip_norm``, summed over the batch; also the norms
    before clipping. One example moves the sum by at most ``clip_norm`` (the sensitivity the noise is sized for)."""
    flat = [g.reshape(g.shape[0], -1) for g in grads.values()]
    norms = torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1) if flat else torch.zeros(0)
    factor = (clip_norm / (norms + _NORM_EPS)).clamp(max=1.0)
    summed = {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}
    return summed, norms


def noisy_mean(summed: dict[str, torch.Tensor], clip_norm: float, noise_multiplier: float, expected_batch: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """(sum + N(0, (sigma C)^2)) / expected batch size. Dividing by the expected size, not the sampled one, keeps
    the batch's actual size (which depends on the data) out of the update."""
    out = {}
    for k, s in summed.items():
        noise = torch.normal(0.0, noise_multiplier * clip_norm, size=s.shape, generator=generator, dtype=s.dtype)
        out[k] = (s + noise.to(s.device)) / expected_batch
    return out
