"""Prototype switches for the levers `bench_learning.py --lever` measures besides manifest settings, as a `Node`
subclass swapped into the simulator for one run. They exist to compare against what the node does by itself.

Knobs (``Lever.node``):
- ``serving: False``: the peer serves the model it holds (the node's behaviour before the serving model).
- ``reset``: after an aggregation, ``momentum`` drops the optimizer's first-moment state (SGD momentum buffers, Adam's
  exp_avg), ``all`` the whole optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from quinkgl_cli.node import core, wiring


class ProtoNode(core.Node):
    knobs: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.knobs.get("serving") is False:
            self.serving.enabled = False

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
