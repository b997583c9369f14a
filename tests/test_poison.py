"""A node under model poisoning: huge finite updates are refused by its aggregator, and a poisoned aggregate that
gets through anyway (an aggregator without bounds) makes training roll back to the last good model instead of
stopping the node."""

from __future__ import annotations

import logging
import math
from copy import deepcopy as copy_module

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli import wire
from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.node.core import Node, NodeConfig
from quinkgl_cli.sim.baseline import AdoptGlobal
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate
from quinkgl_cli.strategies.sharing import ENCODING as COMPRESSED
from quinkgl_cli.strategies.sharing import SharingPipeline
from quinkgl_cli.tensors import flatten, load_flat
from quinkgl_cli.transport.base import ModelReceived
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport
from tests.test_node_core import H, data, forged, manifest


def _node(aggregator: Aggregator | None = None) -> Node:
    net = MemoryNetwork(auto_deliver=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    train, val = data(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    transport = MemoryTransport(net, "me", swarm_id="s", arch_hash=H)
    node = Node(NodeConfig("me", rounds=10, seed=0), manifest(), "sha256:swarm", model, train, val, opt, transport,
                clock=lambda: 0.0, aggregator=aggregator)
    transport.start_sync(node)
    return node


def _round(node: Node, updates: list[tuple[str, torch.Tensor]] = ()) -> None:  # type: ignore[assignment]
    node.begin_round()
    node.train_round()
    for sender, flat in updates:
        node.on_model(forged(node, sender, node.round, flat, 30))
    node.aggregate()
    node.evaluate()
    node.end_round()


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "qgl_event", "") == name]


def test_huge_finite_updates_are_refused_and_the_default_node_keeps_training(caplog: pytest.LogCaptureFixture) -> None:
    # The attack that killed every default daemon: updates of 1e30s (finite, right shapes) into FedAvg.
    node = _node()
    _round(node)
    huge = torch.full_like(flatten(node.model), 1e30)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            _round(node, [("evil-1", huge), ("evil-2", 2 * huge)])  # the same bytes twice: a copy, dropped earlier
    assert {r.qgl_fields["peer"] for r in _events(caplog, "update-refused")} == {"evil-1", "evil-2"}  # type: ignore[attr-defined]
    assert not _events(caplog, "training-rolled-back")
    assert bool(torch.isfinite(flatten(node.model)).all()) and float(flatten(node.model).abs().max()) < 100
    assert all(h["loss"] is not None and h["loss"] < 10 for h in node.history)


def test_a_poisoned_aggregate_rolls_training_back_to_the_last_good_model(caplog: pytest.LogCaptureFixture) -> None:
    node = _node(AdoptGlobal("evil"))  # adopts the sender's model verbatim: no bounds at all
    _round(node)
    good = node.trainer.last_good
    assert good is not None and torch.equal(good, flatten(node.model))
    huge = torch.full_like(good, 1e30)
    _round(node, [("evil", huge)])
    assert float(flatten(node.model).abs().min()) > 1e29  # the poison is in: the next loss overflows
    with caplog.at_level(logging.WARNING, logger="quinkgl.node"):
        _round(node)
    (rolled,) = _events(caplog, "training-rolled-back")
    assert rolled.qgl_fields["loss"] in ("nan", "inf", "-inf")  # type: ignore[attr-defined]  # as events write them
    assert node.completed_round == 3 and node.history[-1]["loss"] is not None and node.history[-1]["loss"] < 10
    assert bool(torch.isfinite(flatten(node.model)).all()) and float(flatten(node.model).abs().max()) < 100


def test_training_that_diverges_again_after_the_rollback_still_stops_the_node() -> None:
    node = _node()
    _round(node)
    x = torch.full((10, 4), float("nan"))
    node.trainer.train_loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=5)
    node.begin_round()
    with pytest.raises(NodeConfigError, match="training loss became nan in round 2"):
        node.train_round()
    fresh = _node()  # no good model yet: nothing to roll back to
    fresh.trainer.train_loader = node.trainer.train_loader
    fresh.begin_round()
    with pytest.raises(NodeConfigError, match="training loss became nan in round 1") as exc:
        fresh.train_round()
    assert exc.value.hint is not None and "lower the learning rate" in exc.value.hint


def _batchnorm_node(**compression: object) -> Node:
    """A node of a BatchNorm model after one round alone (with these compression settings, if any)."""
    net = MemoryNetwork(auto_deliver=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    train, val = data(0)
    transport = MemoryTransport(net, "me", swarm_id="s", arch_hash=H)
    spec = manifest()
    if compression:
        spec = spec.model_copy(update={"compression": CompressionSpec(**compression)})
    node = Node(NodeConfig("me", rounds=10, seed=0), spec, "sha256:swarm", model, train, val,
                torch.optim.SGD(model.parameters(), lr=0.05), transport, clock=lambda: 0.0)
    transport.start_sync(node)
    _round(node)
    return node


def _variance_offset(node: Node) -> int:
    """Where the BatchNorm's running variance starts in the node's flat model."""
    floats = [(name, t.numel()) for name, t in node.model.state_dict().items() if t.is_floating_point()]
    return sum(n for _, n in floats[:[name for name, _ in floats].index("1.running_var")])


def test_a_model_with_a_negative_running_variance_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Averaged in, a negative BatchNorm variance makes every evaluation NaN while training looks healthy: such a
    model (here a noise attacker's) is no trained model and is dropped on arrival; a sound one is still taken."""
    node = _batchnorm_node()
    sound = flatten(node.model)
    noisy = sound.clone()
    noisy[_variance_offset(node)] = -0.5  # one entry of 1.running_var

    def sent(flat: torch.Tensor) -> bytes:
        copy = copy_module(node.model)
        load_flat(copy, flat)
        return wire.encode({s.name: copy.state_dict()[s.name] for s in node.specs}, meta={"step": 0})

    node.begin_round()
    node.train_round()
    for sender, flat in (("noisy", noisy), ("sound", sound + 0.01)):
        node.on_model(ModelReceived(sender, node.round, sent(flat), 30, "qgl-tensors/1", {"step": 0}, 0.0))
    with caplog.at_level(logging.INFO):
        node.aggregate()
    dropped = _events(caplog, "update-dropped")
    assert [r.qgl_fields["peer"] for r in dropped] == ["noisy"]  # type: ignore[attr-defined]
    assert "1.running_var holds a negative variance" in dropped[0].qgl_fields["reason"]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("aggregated")] == [
        "aggregated models peers=1 samples=60 from=[sound] strategy=FedAvg"]
    assert bool((node.model[1].running_var >= 0).all())


def test_a_compressed_model_with_a_negative_running_variance_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """The same screen for a compressed swarm: the sender's model rebuilt from its deltas is what would be averaged.
    Before, only full-weight updates were screened: this one was clipped and averaged in, the node's running
    variance went negative and stayed so through the next round's training, and its evaluation gave NaN."""
    node = _batchnorm_node(quantize_bits=16)
    sound = flatten(node.model)
    noisy = sound.clone()
    at = _variance_offset(node)
    noisy[at:at + 8] = -3.0  # all of 1.running_var: inside the distance clip
    pipes = {name: SharingPipeline(node.manifest.compression, node.manifest.privacy, sound.numel(), start=sound)
             for name in ("noisy", "sound")}
    node.begin_round()
    node.train_round()
    for sender, flat in (("noisy", noisy), ("sound", sound + 0.01)):
        payload = pipes[sender].encode("me", flat, {}, {"step": 0}).payload
        node.on_model(ModelReceived(sender, node.round, payload, 30, COMPRESSED, {"step": 0}, 0.0))
    with caplog.at_level(logging.INFO):
        node.aggregate()
    dropped = _events(caplog, "update-dropped")
    assert [r.qgl_fields["peer"] for r in dropped] == ["noisy"]  # type: ignore[attr-defined]
    assert "1.running_var holds a negative variance" in dropped[0].qgl_fields["reason"]  # type: ignore[attr-defined]
    assert bool((node.model[1].running_var >= 0).all())


def test_a_served_average_that_evaluates_to_nan_gives_way_to_the_held_model(caplog: pytest.LogCaptureFixture) -> None:
    """Every entry of the served average is a finite model, yet their mean need not work (a running variance gone
    negative): such a round serves the model the node holds, says so, and the next round averages again."""
    node = _batchnorm_node()
    node.begin_round()
    node.train_round()
    node.share()  # notes the node's own model for serving
    broken = flatten(node.model)
    start = _variance_offset(node)
    broken[start:start + 8] = -50.0  # averaged with the own model's variances: still below zero
    node.serving.note_peers([PeerUpdate("other", node.round, broken, 30)])  # heard outside this round's aggregation
    assert node.serving.model(node.round) is not node.model
    with caplog.at_level(logging.WARNING):
        loss, accuracy = node.evaluate()
    assert loss is not None and math.isfinite(loss) and accuracy is not None
    assert len(_events(caplog, "served-model-unusable")) == 1
    assert node.serving.model(node.round) is node.model
    assert node.serving.model(node.round + 1) is not node.model  # the next round averages again
