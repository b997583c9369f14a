"""What an aggregation does to the optimizer's state (`quinkgl_cli.node.moments`): second moments floored at their
median (exactly the rule on Adam, AdamW, AMSGrad's, RMSprop's and Adagrad's state, nothing else touched, floors of successive
aggregations do not compound) and SGD's momentum buffers mixed with the round's movement per step; other
optimizers left alone by both."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from quinkgl_cli.node.moments import MIX, MomentRules, floor_second_moments, global_momentum


def trained(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    opt = make(list(model.parameters()))
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def snapshot(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)} for st in opt.state.values()]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
])
def test_second_moments_are_floored_at_their_median_and_nothing_else_moves(
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    model, opt = trained(make)
    before = snapshot(opt)
    keys = [k for k in ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum") if k in before[0]]
    assert keys
    assert floor_second_moments(opt, model.parameters()) == len(keys) * len(before)
    for old, st in zip(before, opt.state.values(), strict=True):
        for key, value in old.items():
            if key in keys:
                expected = value.clamp(min=float(value.flatten().median()))
                assert torch.equal(st[key], expected)
                assert not torch.equal(st[key], value)  # the rule did something: the low half was below the median
            else:
                assert torch.equal(st[key], value)  # first moments and the step count are the optimizer's own


def test_floors_do_not_compound() -> None:
    # Raising the low half to the median leaves the median: a second aggregation with no training in between
    # changes nothing (a mean's floor would climb toward the maximum aggregation after aggregation).
    model, opt = trained(lambda ps: torch.optim.Adam(ps, lr=1e-3))
    floor_second_moments(opt, model.parameters())
    once = snapshot(opt)
    floor_second_moments(opt, model.parameters())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(once, snapshot(opt), strict=True) for k in a)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adadelta(ps),  # square_avg as RMSprop's, but under a step ratio: not measured, left alone
    lambda ps: torch.optim.Adamax(ps, lr=1e-3),
])
def test_other_optimizers_are_left_alone(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    model, opt = trained(make)
    before = snapshot(opt)
    assert floor_second_moments(opt, model.parameters()) == 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, snapshot(opt), strict=True) for k in a)


def test_only_the_given_parameters_are_floored() -> None:
    # FedRep keeps its head home: the node floors the shared backbone's moments only.
    model, opt = trained(lambda ps: torch.optim.Adam(ps, lr=1e-3))
    head = list(model[2].parameters())
    before = {id(p): opt.state[p]["exp_avg_sq"].clone() for p in head}
    assert floor_second_moments(opt, model[0].parameters()) == 2
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], before[id(p)]) for p in head)


def test_sgd_buffers_become_half_the_rounds_movement_per_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rules = MomentRules()
    rules.training_begins(opt, model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rules.training_ended(3)
    with torch.no_grad():  # the aggregation moves the model on
        for p in model.parameters():
            p.add_(0.01)
    own = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rules.model_replaced(opt, model.parameters())
    for p, before, buf in zip(model.parameters(), start, own, strict=True):
        expected = MIX * buf + (1 - MIX) * (before - p.detach()) / (0.05 * 3)
        assert torch.allclose(opt.state[p]["momentum_buffer"], expected, atol=1e-7)
        assert not torch.allclose(opt.state[p]["momentum_buffer"], buf)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1),  # no momentum: no buffer, and no copy of the model kept
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),  # a buffer of that name, another optimizer
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
])
def test_global_momentum_leaves_other_optimizers_alone(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    model, opt = trained(make)
    start = {p: p.detach().clone() + 0.1 for p in model.parameters()}
    before = snapshot(opt)
    assert global_momentum(opt, start, steps=3) == 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, snapshot(opt), strict=True) for k in a)


def test_no_training_no_global_momentum() -> None:
    # An aggregation before any local step of the round (a late joiner's first round): the buffer is kept.
    model, opt = trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    rules = MomentRules()
    rules.training_begins(opt, model.parameters())
    before = snapshot(opt)
    rules.model_replaced(opt, model.parameters())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, snapshot(opt), strict=True) for k in a)


def test_an_untrusted_aggregation_leaves_the_buffers_their_own() -> None:
    # The node passes trusted=False when the poison guard refused or clipped an update (tests/test_sim.py's
    # sign-flip swarm: with the buffers taking that movement in, FedAvg fell from 0.77 to 0.39).
    model, opt = trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    rules = MomentRules()
    rules.training_begins(opt, model.parameters())
    rules.training_ended(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    before = snapshot(opt)
    rules.model_replaced(opt, model.parameters(), trusted=False)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, snapshot(opt), strict=True) for k in a)
    rules.model_replaced(opt, model.parameters(), trusted=True)
    assert not all(torch.equal(a[k], b[k]) for a, b in zip(before, snapshot(opt), strict=True) for k in a)
