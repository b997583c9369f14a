"""Prototypes of the learning levers `bench_learning.py --lever` measures, as a `Node` subclass swapped into the
simulator for one run. They exist to choose the defaults; what is chosen lives in the node itself.

Knobs (``Lever.node``):
- ``serving``: the model a peer reports (evaluates) is the sample-weighted mean of its own latest shared model (as
  trained, before aggregation) and the latest model it received from each peer (no extra traffic); with every peer
  heard every round it is the round's full average.
- ``mix``: ``latest`` aggregates the local model with the latest model of every peer heard from (not only the ones
  that arrived this round); ``inbox`` is the node's own behaviour.
- ``reset``: after an aggregation, ``momentum`` drops the optimizer's first-moment state (SGD momentum buffers, Adam's
  exp_avg), ``all`` the whole optimizer state; ``keep`` is the node's own behaviour.
- ``max_age``: latest models older than this many rounds are left out of ``serving`` and ``mix``.
- ``decay``: in ``serving``, a model ``a`` rounds old weighs ``decay ** a`` times its sample count.
- ``ema``: the served model is instead an exponential moving average (this factor on the old average) of the model
  the peer holds at the end of each round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from quinkgl_cli.node import core
from quinkgl_cli.sim import simulator
from quinkgl_cli.strategies.aggregation import weighted_mean_rows
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, PeerUpdate
from quinkgl_cli.tensors import flatten, load_flat


class _LatestMix:
    """Wraps the node's aggregator: the updates it sees are the latest of every peer heard from."""

    def __init__(self, inner: Aggregator, node: ProtoNode) -> None:
        self._inner = inner
        self._node = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        return self._inner.aggregate(local, self._node.recent(), current_round)


class ProtoNode(core.Node):
    knobs: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._latest: dict[str, PeerUpdate] = {}
        if self.knobs.get("mix") == "latest":
            self.aggregator = _LatestMix(self.aggregator, self)  # type: ignore[assignment]

    def recent(self) -> list[PeerUpdate]:
        age = int(self.knobs.get("max_age", 10))
        return [u for _, u in sorted(self._latest.items()) if u.round >= self.round - age]

    def decode_update(self, msg: Any) -> PeerUpdate:
        update = super().decode_update(msg)
        self._latest[update.peer_id] = update
        return update

    def aggregate(self) -> Any:
        if getattr(self, "_own_round", None) != self.round:
            self._own_round = self.round
            self._own = flatten(self.model)
        outcome = super().aggregate()
        reset = self.knobs.get("reset", "keep")
        if outcome is not None and reset != "keep":
            if reset == "all":
                self.optimizer.state.clear()
            else:
                for state in self.optimizer.state.values():
                    state.pop("momentum_buffer", None)
                    if "exp_avg" in state:
                        state["exp_avg"].zero_()
        return outcome

    def evaluate(self) -> tuple[float | None, float | None]:
        own = flatten(self.model)
        ema = self.knobs.get("ema")
        if ema is not None:
            held = getattr(self, "_ema", None)
            self._ema = own.clone() if held is None else held.mul_(ema).add_(own, alpha=1.0 - ema)
            serving = self._ema
        elif self.knobs.get("serving"):
            decay = float(self.knobs.get("decay", 1.0))
            recent = self.recent()
            rows = [getattr(self, "_own", own)] + [u.flat for u in recent]
            weights = [float(max(self.sample_count, 1))] + [
                float(u.sample_count) * decay ** (self.round - u.round) for u in recent]
            total = sum(weights)
            serving = weighted_mean_rows(rows, [w / total for w in weights])
        else:
            return super().evaluate()
        load_flat(self.model, serving)
        try:
            return super().evaluate()
        finally:
            load_flat(self.model, own)


@contextmanager
def patched(knobs: dict[str, Any]) -> Iterator[None]:
    """Run simulations inside the block with `ProtoNode` and ``knobs``."""
    saved = simulator.Node
    ProtoNode.knobs = dict(knobs)
    simulator.Node = ProtoNode  # type: ignore[misc]
    try:
        yield
    finally:
        simulator.Node = saved  # type: ignore[misc]
        ProtoNode.knobs = {}

