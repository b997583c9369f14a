"""A training step drops the gradients itself when the optimizer's zero_grad is torch's own, and calls an
optimizer's own zero_grad when it has one; the trained model is the one torch's zero_grad gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quinkgl_cli.node.trainer import drop_grads
from quinkgl_cli.tensors import flatten
from quinkgl_cli.transport.memory import MemoryNetwork
from tests.test_node_core import make_node, manifest, run_round


def _refuse(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    raise AssertionError("torch's zero_grad was called")


def _trained(rounds: int) -> list[torch.Tensor]:
    net = MemoryNetwork(auto_deliver=False)
    nodes = [make_node(net, f"p{i}", manifest(), i, seed=i) for i in range(3)]
    net.deliver_all()
    for _ in range(rounds):
        run_round(net, nodes)
    return [flatten(n.model) for n in nodes]


def test_training_never_calls_torchs_zero_grad_and_trains_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _trained(2)
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", _refuse)
    got = _trained(2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_gradients_are_dropped() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    drop_grads(opt)
    assert all(p.grad is None for p in model.parameters())


def test_an_optimizers_own_zero_grad_is_called() -> None:
    calls: list[Any] = []

    class Own(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    model = nn.Linear(3, 2)
    opt = Own(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    drop_grads(opt)
    assert calls == [True] and all(p.grad is None for p in model.parameters())
