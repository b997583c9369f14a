"""Slow momentum on the aggregated change (`strategies.momentum`): the arithmetic, the merge, checkpoint state, and
which rules the node wraps by default."""

from __future__ import annotations

import pytest
import torch

from quinkgl_cli.manifest import catalogue
from quinkgl_cli.node.core import build_aggregator
from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.aggregation import FedAvg
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate
from quinkgl_cli.strategies.choco import ConsensusStep
from quinkgl_cli.strategies.momentum import STATE_KEY, SlowMomentum
from quinkgl_cli.tensors import load_flat
from tests.helpers_manifest import make_manifest


def upd(pid: str, values: list[float], local: bool = False) -> PeerUpdate:
    return PeerUpdate(pid, 1, torch.tensor(values, dtype=torch.float32), 10, is_local=local)


def fedavg() -> FedAvg:
    entry = catalogue.resolve("aggregation", "FedAvg")
    return FedAvg(registry.build_params(entry, {}))


def warm_up(agg: SlowMomentum) -> None:
    """Two exchanges: the first joins (v = 0), the second moves the mean by (1, 1), so v = (1, 1)."""
    agg.aggregate(upd("a", [0, 0], local=True), [upd("b", [2, 2])], 1)
    agg.aggregate(upd("a", [1, 1], local=True), [upd("b", [3, 3])], 2)


def test_velocity_accumulates_the_averaged_change() -> None:
    agg = SlowMomentum(fedavg(), beta=0.5)
    # The first aggregation joins the swarm: the plain mean, v = 0.
    first = agg.aggregate(upd("a", [0, 0], local=True), [upd("b", [2, 2])], 1).flat
    assert torch.allclose(first, torch.tensor([1.0, 1.0]))
    # Next exchanges from the previous result: mean (2,2), delta (1,1), v = (1,1); then mean (3,3), v = 0.5 v + (1,1).
    second = agg.aggregate(upd("a", [1, 1], local=True), [upd("b", [3, 3])], 2).flat
    assert torch.allclose(second, torch.tensor([2.0, 2.0]))
    third = agg.aggregate(upd("a", [2, 2], local=True), [upd("b", [4, 4])], 3).flat
    assert torch.allclose(third, torch.tensor([3.5, 3.5]))
    zero = SlowMomentum(fedavg(), beta=0.0)
    for _ in range(2):  # beta 0 is the rule itself, exchange after exchange
        assert torch.allclose(zero.aggregate(upd("a", [1, 1], local=True), [upd("b", [3, 5])], 1).flat,
                              torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError):
        SlowMomentum(fedavg(), beta=1.0)


def test_the_merge_only_averages() -> None:
    agg = SlowMomentum(fedavg(), beta=0.5)
    warm_up(agg)
    assert agg.state_dict()[STATE_KEY].abs().sum() > 0
    agg.begin_consensus()
    assert torch.allclose(agg.aggregate(upd("a", [5, 5], local=True), [upd("b", [7, 7])], 3).flat,
                          torch.tensor([6.0, 6.0]))
    assert STATE_KEY not in agg.state_dict()
    fedavgm = build_aggregator(make_manifest(aggregation="FedAvgM"))
    fedavgm.aggregate(upd("a", [0, 0], local=True), [upd("b", [2, 2])], 1)
    fedavgm.begin_consensus()  # FedAvgM too: its velocity (0.9 by default) would carry the peers past the mean
    assert torch.allclose(fedavgm.aggregate(upd("a", [1, 1], local=True), [upd("b", [3, 3])], 2).flat,
                          torch.tensor([2.0, 2.0]))


def test_velocity_survives_a_checkpoint() -> None:
    agg = SlowMomentum(fedavg())
    warm_up(agg)
    restored = SlowMomentum(fedavg())
    restored.load_state_dict(agg.state_dict())
    a = agg.aggregate(upd("a", [2, 2], local=True), [upd("b", [4, 4])], 3).flat
    assert torch.equal(restored.aggregate(upd("a", [2, 2], local=True), [upd("b", [4, 4])], 3).flat, a)
    with pytest.raises(ValueError):
        restored.load_state_dict({STATE_KEY: torch.tensor([float("inf"), 0.0])})
    with pytest.raises(ValueError):  # what is not the velocity goes to the rule, which keeps no state
        restored.load_state_dict({"momentum": torch.zeros(2)})


@pytest.mark.parametrize(("name", "wrapped"), [
    ("FedAvg", True), ("FedProx", True), ("StalenessWeightedFedAvg", True), ("EntropyWeightedAvg", True),
    ("FedAvgM", False), ("Scaffold", False), ("Krum", False), ("Median", False), ("TrimmedMean", False),
])
def test_default_wraps_plain_averaging_rules_only(name: str, wrapped: bool) -> None:
    agg: Aggregator = build_aggregator(make_manifest(aggregation=name))
    assert isinstance(agg, SlowMomentum) is wrapped
    assert agg.name == name


def test_choco_keeps_its_consensus_step() -> None:
    manifest = make_manifest(compression_params={"top_k_ratio": "0.1", "mode": "choco"}, topology="RingTopology")
    agg = build_aggregator(manifest)
    assert isinstance(agg, ConsensusStep) and not isinstance(agg.inner, SlowMomentum)


def bn_model() -> torch.nn.Module:
    """Flat layout: linear weight (4), bias (2), BatchNorm weight (2), bias (2), running mean (2), running var (2);
    a frozen parameter too: the first Linear's bias."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("momentum", ["slow", "FedAvgM"])
def test_momentum_moves_only_what_training_moves(momentum: str) -> None:
    """Running statistics and frozen parameters take the plain average: momentum would carry a falling running
    variance past the average (and, exchange after exchange, below zero: NaN at every evaluation)."""
    agg: Aggregator = (SlowMomentum(fedavg(), beta=0.9) if momentum == "slow"
                       else build_aggregator(make_manifest(aggregation="FedAvgM")))
    model = bn_model()
    still = torch.tensor([False] * 4 + [True] * 2 + [False] * 4 + [True] * 4)

    def flat(level: float, var: float) -> torch.Tensor:
        return torch.tensor([level] * 12 + [var] * 2)

    load_flat(model, flat(0, 1.0))
    agg.begin_training(model, 0.1)
    out = torch.empty(0)
    for step, (level, var, other_var) in enumerate([(0, 1.0, 0.2), (1, 0.6, 0.2), (2, 0.4, 0.0)], start=1):
        out = agg.aggregate(upd("a", flat(level, var).tolist(), local=True),
                            [upd("b", flat(level + 2, other_var).tolist())], step).flat
    plain = flat(3, 0.2)  # the last exchange's mean
    assert torch.allclose(out[still], plain[still])
    assert bool((out[~still] > plain[~still] + 0.5).all())  # momentum still carries the trained entries on
    state = agg.state_dict()
    velocity = state.get(STATE_KEY, state.get("momentum"))
    assert velocity is not None and bool((velocity[still] == 0).all())
