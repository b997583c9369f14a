"""The simulator's attacks from the robust-aggregation literature: what each attacker knows, and what it sends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.manifest.strategy_params import FedAvgParams
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.attacks import (
    ALIE_Z,
    IPM_EPSILON,
    Eavesdrop,
    FlippedLabels,
    alie,
    alie_z,
    ipm,
    parse_attackers,
    tamper_for,
)
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from quinkgl_cli.strategies.aggregation import FedAvg
from quinkgl_cli.strategies.base import PeerUpdate
from quinkgl_cli.strategies.momentum import SlowMomentum

SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


@pytest.fixture(scope="module")
def script() -> PeerScript:
    return load_script(SCRIPT)


def manifest(script: PeerScript) -> Manifest:
    return build_manifest(
        name="digits-attacks", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="RandomTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
    )


def update(peer: str, values: list[float], local: bool = False) -> PeerUpdate:
    return PeerUpdate(peer, 1, torch.tensor(values), 10, is_local=local)


def _fedavg() -> FedAvg:
    return FedAvg(FedAvgParams())


@pytest.mark.parametrize("kind", ["alie", "ipm", "labelflip", "silent"])
def test_the_new_attacks_are_attacker_kinds(kind: str) -> None:
    assert parse_attackers(f"2:{kind}") == (2, kind)


def test_alie_z_is_the_papers_quantile() -> None:
    # s = floor(n/2 + 1) - f supporters; z = Phi^-1((n - s) / n): 2 of 20 -> Phi^-1(0.55), 24 of 50 -> Phi^-1(0.96).
    assert alie_z(20, 2) == pytest.approx(0.12566, abs=1e-4)
    assert alie_z(50, 24) == pytest.approx(1.75069, abs=1e-4)


def test_alie_sends_the_known_models_mean_minus_z_deviations() -> None:
    own = torch.tensor([1.0, 0.0, 4.0])
    received = [torch.tensor([3.0, 2.0, 4.0]), torch.tensor([2.0, 4.0, 4.0])]
    sent = alie(own, received, z=1.0)
    # mean (2, 2, 4); population std (0.8165, 1.633, 0)
    assert torch.allclose(sent, torch.tensor([2.0 - 0.81650, 2.0 - 1.63299, 4.0]), atol=1e-4)
    assert torch.equal(alie(own, []), own)  # nothing heard yet: its honest model


def test_ipm_moves_the_own_model_back_along_the_honest_means_movement() -> None:
    own = torch.tensor([1.0, 1.0])
    means = [torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.25])]
    assert torch.allclose(ipm(own, means, epsilon=4.0), torch.tensor([-1.0, 2.0]))
    assert torch.equal(ipm(own, means[1:]), own)  # one mean is no movement yet


def test_eavesdrop_notes_the_honest_models_and_aggregates_as_its_rule() -> None:
    rule = _fedavg()
    heard = Eavesdrop(SlowMomentum(_fedavg()), frozenset({"mate"}))
    local = update("me", [1.0, 1.0, 1.0], local=True)
    others = [update("a", [1.2, 0.9, 1.0]), update("b", [0.8, 1.1, 1.2]), update("mate", [1.0, 1.0, 0.9])]
    result = heard.aggregate(local, others, 1)
    assert torch.equal(result.flat, rule.aggregate(local, others, 1).flat)  # the first aggregation: no momentum yet
    assert [t.tolist() for t in heard.received] == [u.flat.tolist() for u in others[:2]]  # the fellow attacker left out
    assert torch.allclose(heard.means[0], torch.tensor([1.0, 1.0, 16 / 15]))
    heard.aggregate(local, [update("mate", [1.0, 1.0, 1.0])], 2)  # only the colluder: nothing new learnt
    assert len(heard.means) == 1 and len(heard.received) == 2
    heard.aggregate(local, [update("c", [2.0, 2.0, 2.0])], 3)
    assert len(heard.means) == 2 and torch.allclose(heard.means[1], torch.tensor([1.5, 1.5, 1.5]))


@pytest.mark.parametrize("kind", ["alie", "ipm"])
def test_the_tamper_sends_from_what_the_attacker_heard(kind: str) -> None:
    heard = Eavesdrop(_fedavg(), frozenset())
    tamper = tamper_for(kind, 0, heard)
    own = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(tamper(own), own)  # round 1: it shares before it has aggregated
    for r, shift in enumerate((0.0, 0.3), start=1):
        heard.aggregate(update("me", [1.0 + shift, 2.0, 3.0], local=True),
                        [update("a", [1.5 + shift, 2.5, 3.0]), update("b", [0.5 + shift, 1.0, 3.5])], r)
    expected = alie(own, heard.received, ALIE_Z) if kind == "alie" else ipm(own, heard.means, IPM_EPSILON)
    assert torch.equal(tamper(own), expected) and not torch.equal(expected, own)
    with pytest.raises(ValueError):
        tamper_for(kind, 0)


def test_flipped_labels_train_on_c_minus_one_minus_y() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    flipped = FlippedLabels(DataLoader(TensorDataset(x, y), batch_size=4), classes=10)
    batches = list(flipped)
    assert len(flipped) == 2 and flipped.batch_size == 4
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor([9, 8, 7, 6, 5, 0]))
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert flipped.dataset is not None and len(flipped.dataset) == 6 and int(flipped.dataset[5][1]) == 0


def test_labelflip_attackers_train_on_flipped_labels_and_share_as_is(script: PeerScript) -> None:
    sim = Simulator(script, manifest(script), SimConfig(peers=6, rounds=1, partition="shards:2", seed=2, attackers=2,
                                                        attack="labelflip"))
    sim.build()
    attackers = set(sim.attackers)
    assert len(attackers) == 2
    for node in sim.nodes:
        flipped = isinstance(node.train_loader, FlippedLabels)
        assert flipped == (node.node_id in attackers)
        assert node.exchange.tamper is None  # its model is shared untouched
        if flipped:
            assert node.train_loader.classes == 10
            honest = {int(v) for b in node.train_loader.loader for v in b[1]}
            assert {int(v) for b in node.train_loader for v in b[1]} == {9 - v for v in honest}


def test_alie_attackers_hear_their_partners_and_not_each_other(script: PeerScript) -> None:
    sim = Simulator(script, manifest(script), SimConfig(peers=6, rounds=2, partition="shards:2", seed=2, attackers=2,
                                                        attack="alie"))
    sim.run()
    attackers = set(sim.attackers)
    for node in sim.nodes:
        assert isinstance(node.aggregator, Eavesdrop) == (node.node_id in attackers)
        assert (node.exchange.tamper is not None) == (node.node_id in attackers)
    spies = [n.aggregator for n in sim.nodes if isinstance(n.aggregator, Eavesdrop)]
    assert all(spy.received and len(spy.means) == 2 and spy.colluders == frozenset(attackers) for spy in spies)


def test_silent_members_take_models_and_send_none(script: PeerScript) -> None:
    sim = Simulator(script, manifest(script), SimConfig(peers=6, rounds=2, partition="shards:2", seed=2, attackers=2,
                                                        attack="silent"))
    result = sim.run()
    attackers = set(sim.attackers)
    assert len(attackers) == 2
    for peer in result.rounds[-1].peers:
        if peer.peer in attackers:
            assert peer.updates_sent == 0 and peer.bytes_sent == 0 and peer.bytes_received > 0
        else:
            assert peer.updates_sent > 0
    assert all(node.exchange.tamper is None for node in sim.nodes)
