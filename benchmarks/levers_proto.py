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
        if outcome is not None and reset == "all":
            self.optimizer.state.clear()
        elif outcome is not None and reset == "momentum":
            for state in self.optimizer.state.values():
                state.pop("momentum_buffer", None)
                if "exp_avg" in state:
                    state["exp_avg"].zero_()
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
