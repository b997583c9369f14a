"""Prototype switches for the levers `bench_learning.py --lever` measures besides manifest settings, as a `Node`
subclass swapped into the simulator for one run. They exist to compare against what the node does by itself.

Knobs (``Lever.node``):
- ``serving: False``: the peer serves the model it holds (the node's behaviour before the serving model).
- ``reset``: after an aggregation, ``momentum`` drops the optimizer's first-moment state (SGD momentum buffers, Adam's
  exp_avg), ``all`` the whole optimizer state.
- ``lr_halflife``: H: every param group's learning rate is scaled by ``(1 + (round - 1) / H) ** -0.5`` before local
  training (a horizon-free decay the node can apply to any optimizer).
- ``serve_ema``: a: the served model is an exponential moving average over rounds (weight ``a`` on the past) of the
  serving model's cross-peer mean.
- ``mix_start``: m: local training starts from ``(1 - m) * held + m * served``.
- ``topology: "shuffle"``: every peer sends to the peers at ``fanout`` offsets of a ring ordered by id hash, the
  offsets drawn anew each round, the same on every peer: balanced in-degree like `RotationTopology`, but random
  coverage.
- ``serve_age``: g: served entries weigh ``g ** age`` (rounds) on top of their sample counts.
- ``floor: False``: Adam's second moments are not floored at aggregation; ``global_momentum: False``: SGD's
  momentum buffers are kept at aggregation (the node's behaviours before `quinkgl_cli.node.moments`).
- ``reset`` also takes rules for the optimizer's state after an aggregation (the node's floor off):
  ``adam-all`` / ``adam-m`` / ``adam-v`` clear an Adam-type optimizer's state / first moments / second moments,
  ``scale-m`` / ``adam-scale-m`` scale first moments (SGD's too / Adam's only) by this peer's sample share of the
  aggregation, ``adam-step0`` restarts the bias correction at step 1 keeping the corrected moments,
  ``vfloorS`` raises each second-moment tensor to at least S times its mean, ``vmax`` fills it with its maximum.
- ``min_steps``: N: local training makes whole passes over the data until at least N optimizer steps (a peer with
  little data trains more epochs; one whose ``local_epochs`` passes already take N steps is unchanged; 0:
  ``local_epochs`` passes), in place of the manifest's ``min_local_steps`` (`quinkgl_cli.node.localwork`).
- ``qgm``: mu: quasi-global momentum at aggregation: first moments (SGD momentum buffers, Adam's ``exp_avg`` in
  its own units) become ``mu * own + (1 - mu) *`` the round's model displacement per step (``adaptive_only``:
  Adam's only; ``sgd_only``: SGD's momentum buffers only).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quinkgl_cli.node import core, wiring
from quinkgl_cli.node.localwork import local_passes
from quinkgl_cli.strategies.base import Topology
from quinkgl_cli.tensors import flatten, load_flat


class Shuffle(Topology):
    """Balanced receivers without RotationTopology's coverage: ``fanout`` offsets on the id-hash ring, drawn anew
    each round, the same draw on every peer."""

    name = "Shuffle"

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        ring = sorted(set(peers) | {self.self_id}, key=lambda pid: hashlib.sha256(pid.encode()).digest())
        n = len(ring)
        if n <= 1:
            return []
        offsets = random.Random(round_idx * 100003 + n).sample(range(1, n), min(self.params.fanout, n - 1))
        me = ring.index(self.self_id)
        return [ring[(me + o) % n] for o in offsets]


class ProtoNode(core.Node):
    knobs: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.knobs.get("serving") is False:
            self.serving.enabled = False
        reset = str(self.knobs.get("reset", ""))
        if self.knobs.get("floor") is False or reset.startswith(("vfloor", "vq", "vmax", "adam-", "scale-m")):
            # The node's own floor on Adam's second moments (`node.moments`) is off: measured without it, or
            # replaced by the knob's own rule.
            self.trainer.moments.floor = False
        if self.knobs.get("global_momentum") is False or reset in ("momentum", "scale-m") or "qgm" in self.knobs:
            # The same for the node's quasi-global momentum on SGD's buffers.
            self.trainer.moments.global_momentum = False
        if "min_steps" in self.knobs:
            self.trainer.local_epochs = local_passes(self.manifest.training.local_epochs, self.trainer.train_loader,
                                                     int(self.knobs["min_steps"]))
        if "topology" in self.knobs:
            old = self.exchange.topology
            self.exchange.topology = Shuffle(old.params, old.self_id, old.rng)
        self._base_lrs = [float(g.get("lr", 0.0)) for g in self.optimizer.param_groups]
        self._ema: torch.Tensor | None = None
        self._ema_round = -1
        served = self.serving.model
        if "serve_age" in self.knobs:
            gamma = float(self.knobs["serve_age"])
            serving = self.serving

            def aged(current_round: int) -> nn.Module:
                entries = serving._recent(current_round)
                if not entries:
                    return serving._model
                if serving._scratch is None:
                    import copy
                    serving._scratch = copy.deepcopy(serving._model)
                w = [e.samples * gamma ** max(current_round - e.round, 0) for e in entries]
                total = sum(w)
                flat = sum(e.flat * (wi / total) for e, wi in zip(entries, w, strict=True))
                load_flat(serving._scratch, flat)
                return serving._scratch

            served = aged
            self.serving.model = aged  # type: ignore[method-assign]
        if "serve_ema" in self.knobs:
            alpha = float(self.knobs["serve_ema"])
            inner = served
            self._ema_scratch: nn.Module | None = None

            def ema(current_round: int) -> nn.Module:
                module = inner(current_round)
                if not self.serving.enabled:
                    return module
                if self._ema_round != current_round:
                    flat = flatten(module)
                    self._ema = flat if self._ema is None else alpha * self._ema + (1 - alpha) * flat
                    self._ema_round = current_round
                if self._ema_scratch is None:
                    import copy
                    self._ema_scratch = copy.deepcopy(self.model)
                load_flat(self._ema_scratch, self._ema)
                return self._ema_scratch

            self.serving.model = ema  # type: ignore[method-assign]

    def train_round(self) -> Any:
        if "qgm" in self.knobs:
            self._ref_params = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
            stats = self._train_round()
            self._steps = max(int(stats.steps), 1)
            return stats
        return self._train_round()

    def _qgm(self, mix: float, adaptive_only: bool, sgd_only: bool = False) -> None:
        """Quasi-global momentum at aggregation: the first moments become (a mix with) the round's displacement of
        the model (training + aggregation) per step, in the units the optimizer steps with."""
        refs = iter(self._ref_params)
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                ref = next(refs)
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                per_step = (ref - p.detach()) / (lr * self._steps)
                if "exp_avg" in st and "exp_avg_sq" in st and not sgd_only:
                    t = float(st["step"])
                    b1, b2 = group["betas"]
                    denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"]
                    st["exp_avg"].mul_(mix).add_(per_step * denom * (1 - b1 ** t), alpha=1 - mix)
                elif not adaptive_only and isinstance(st.get("momentum_buffer"), torch.Tensor):
                    st["momentum_buffer"].mul_(mix).add_(per_step, alpha=1 - mix)

    def _train_round(self) -> Any:
        halflife = self.knobs.get("lr_halflife")
        if halflife is not None:
            scale = (1 + (self.round - 1) / float(halflife)) ** -0.5
            for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = base * scale
        mix = self.knobs.get("mix_start")
        if mix is not None and self.round > 1:
            served = flatten(self.serving.model(self.round))
            load_flat(self.model, (1 - float(mix)) * flatten(self.model) + float(mix) * served)
        return super().train_round()

    def aggregate(self) -> Any:
        outcome = super().aggregate()
        reset = self.knobs.get("reset", "keep")
        if outcome is not None and "qgm" in self.knobs:
            self._qgm(float(self.knobs["qgm"]), bool(self.knobs.get("adaptive_only")), bool(self.knobs.get("sgd_only")))
        if outcome is not None and reset == "all":
            self.optimizer.state.clear()
        elif outcome is not None and reset == "momentum":
            for state in self.optimizer.state.values():
                state.pop("momentum_buffer", None)
                if "exp_avg" in state:
                    state["exp_avg"].zero_()
        elif outcome is not None and reset != "keep":
            share = max(int(self.trainer.sample_count), 1) / max(outcome.samples, 1)
            adaptive = any("exp_avg_sq" in st for st in self.optimizer.state.values())
            for state in self.optimizer.state.values():
                if reset == "adam-all" and adaptive:
                    state.clear()
                elif reset == "adam-m" and "exp_avg" in state:
                    state["exp_avg"].zero_()
                elif reset.startswith("vq") and isinstance(state.get("exp_avg_sq"), torch.Tensor):
                    v = state["exp_avg_sq"]
                    if v.numel() > 1:
                        v.clamp_(min=float(torch.quantile(v.flatten().float(), float(reset[2:]))))
                elif reset == "vfloor-dim0" and isinstance(state.get("exp_avg_sq"), torch.Tensor):
                    v = state["exp_avg_sq"]
                    floor = v.mean(dim=0, keepdim=True) if v.dim() > 1 else v.mean()
                    v.copy_(torch.maximum(v, floor))
                elif reset.startswith("vfloor") and isinstance(state.get("exp_avg_sq"), torch.Tensor):
                    v = state["exp_avg_sq"]
                    scale = float(reset.removeprefix("vfloor") or 1.0)
                    v.clamp_(min=float(v.mean()) * scale)
                elif reset == "vmax" and isinstance(state.get("exp_avg_sq"), torch.Tensor):
                    state["exp_avg_sq"].fill_(float(state["exp_avg_sq"].max()))
                elif reset == "adam-v" and "exp_avg_sq" in state:
                    state["exp_avg_sq"].zero_()
                elif reset == "scale-m":
                    for key in ("exp_avg", "momentum_buffer"):
                        if isinstance(state.get(key), torch.Tensor):
                            state[key].mul_(share)
                elif reset == "adam-scale-m" and "exp_avg" in state:
                    state["exp_avg"].mul_(share)
                elif reset == "adam-step0" and "exp_avg_sq" in state:
                    # m and v kept, bias correction restarted: v is rescaled so v_hat stays what it was at step 1
                    t = float(state["step"])
                    b1, b2 = self.optimizer.param_groups[0]["betas"]
                    state["exp_avg_sq"].mul_((1 - b2) / (1 - b2 ** t))
                    state["exp_avg"].mul_((1 - b1) / (1 - b1 ** t))
                    state["step"].fill_(1.0) if isinstance(state["step"], torch.Tensor) else None
        return outcome


@contextmanager
def patched(knobs: dict[str, Any]) -> Iterator[None]:
    """Run simulations inside the block with `ProtoNode` and ``knobs`` (the simulator builds its nodes through
    `quinkgl_cli.node.wiring.build_node`)."""
    saved = wiring.Node
    ProtoNode.knobs = dict(knobs)
    wiring.Node = ProtoNode  # type: ignore[misc]
    try:
        yield
    finally:
        wiring.Node = saved  # type: ignore[misc]
        ProtoNode.knobs = {}
