"""Learning at every round: a label-disjoint toy swarm keeps each peer's accuracy within the stability bound from
round to round, the default slow momentum at aggregation makes a slow swarm learn faster than plain averaging, what
an aggregation does to the optimizer's state (`node.moments`) lifts SGD-momentum and Adam swarms,
RotationTopology gives every peer's served model every class after one cycle, the served model survives a
checkpoint, and a seed fixes the whole curve. Small and fast; the measured numbers live in
benchmarks/LEARNING.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import NodeState
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.simulator import RoundSummary, SimConfig, Simulator
from quinkgl_cli.tensors import flatten

STABILITY_BOUND = 0.05  # issue 11: no peer loses more than 5 points between consecutive rounds
FROM_ROUND = 5

# Four well-separated classes in 6 dimensions, a linear model with SGD momentum: learnable in a few rounds, and with
# one class per peer a peer's own model forgets the other classes within a round of local training.
BLOBS_SCRIPT = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 6, generator=g) * 0.6 + torch.nn.functional.one_hot(y, 6).float() * 2.0
    return TensorDataset(x, y)

def build_model(manifest, **kw):
    return torch.nn.Linear(6, 4)

def build_loaders(manifest, **kw):
    return DataLoader(_blobs(320, 0), batch_size=8, shuffle=True), DataLoader(_blobs(200, 1), batch_size=200)

def build_optimizer(manifest, model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
"""


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> PeerScript:
    path = Path(tmp_path_factory.mktemp("scripts")) / "blobs_script.py"
    path.write_text(BLOBS_SCRIPT)
    return load_script(path)


# The node's behaviour before the default slow momentum (`strategies.momentum`): FedAvgM without momentum is plain
# averaging, and the node does not wrap it.
PLAIN_AVERAGING = {"aggregation": "FedAvgM", "aggregation_params": {"server_momentum": "0"}}


def blobs_manifest(script: PeerScript, plain: bool = False, topology: str = "RandomTopology",
                   **training: Any) -> Manifest:
    rule: dict[str, Any] = PLAIN_AVERAGING if plain else {"aggregation": "FedAvg"}
    return build_manifest(
        name="blobs", task_type="classification", input_shape="6", output_shape="4", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), topology=topology,
        training_params={"local_epochs": "2", "final_consensus_steps": "0", **training}, **rule,
    )


def swarm(script: PeerScript, serving: bool = True, seed: int = 1, rounds: int = 12, plain: bool = False,
          topology: str = "RandomTopology", moment_rules: bool = True, **training: Any) -> Simulator:
    # 8 peers, one class each (every class on two peers), each sending to 3 peers a round. ``moment_rules``: what
    # an aggregation does to the optimizer's state (`node.moments`); off, the optimizer keeps its state as it is.
    sim = Simulator(script, blobs_manifest(script, plain, topology, **training),
                    SimConfig(peers=8, rounds=rounds, partition="classes:1", seed=seed))
    sim.build()
    for node in sim.nodes:
        node.serving.enabled = serving
        node.trainer.moments.floor = node.trainer.moments.global_momentum = moment_rules
    return sim


def largest_drop(rounds: list[RoundSummary]) -> float:
    accs: dict[str, list[float]] = {}
    for r in rounds:
        if r.round >= FROM_ROUND:
            for p in r.peers:
                assert p.val_accuracy is not None
                accs.setdefault(p.peer, []).append(p.val_accuracy)
    return max(a - b for seq in accs.values() for a, b in zip(seq, seq[1:], strict=False))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_label_disjoint_swarm_stays_within_the_stability_bound(blobs: PeerScript, seed: int) -> None:
    served = swarm(blobs, seed=seed).run()
    assert largest_drop(served.rounds) <= STABILITY_BOUND
    last = served.rounds[-1]
    assert last.min_accuracy is not None and last.min_accuracy > 0.9
    if seed != 2:  # the bound is a real one: with plain averaging, the models the peers hold break it here
        before = swarm(blobs, serving=False, seed=seed, plain=True, moment_rules=False)
        assert largest_drop(before.run().rounds) > STABILITY_BOUND


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_slow_momentum_learns_faster_than_plain_averaging(tmp_path: Path, seed: int) -> None:
    # Plain SGD with a small step and one epoch a round: every peer's progress per round is small, where momentum
    # on the aggregated change helps most (measured: +15 to +25 points at round 8 on these swarms).
    path = tmp_path / "blobs_slow.py"
    path.write_text(BLOBS_SCRIPT.replace("lr=0.1, momentum=0.9", "lr=0.02"))
    slow = load_script(path)

    def run(plain: bool) -> list[RoundSummary]:
        return swarm(slow, seed=seed, rounds=8, plain=plain, local_epochs="1").run().rounds

    default, plain = run(False), run(True)
    assert default[-1].mean_accuracy is not None and plain[-1].mean_accuracy is not None
    assert default[-1].mean_accuracy >= plain[-1].mean_accuracy + 0.10
    assert largest_drop(default) <= STABILITY_BOUND


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rotation_serves_every_peer_a_full_model_after_one_cycle(blobs: PeerScript, seed: int) -> None:
    # RotationTopology: with 8 peers and fanout 3 every peer has heard from all 7 others by round 3, so its served
    # model averages every class (measured: worst peer 94-96% at round 3); uniform random picks leave peers unheard
    # by chance (74-84% there).
    def worst_at_round_3(topology: str) -> float:
        value = swarm(blobs, seed=seed, rounds=3, topology=topology).run().rounds[-1].min_accuracy
        assert value is not None
        return value

    assert worst_at_round_3("RotationTopology") >= 0.9
    assert worst_at_round_3("RandomTopology") < 0.9


def test_same_seed_same_curve(blobs: PeerScript) -> None:
    def curve(seed: int) -> list[list[float | None]]:
        return [[p.val_accuracy for p in r.peers] for r in swarm(blobs, seed=seed).run().rounds]

    first = curve(3)
    assert curve(3) == first and curve(4) != first


def test_served_model_survives_checkpoint_and_resume(blobs: PeerScript) -> None:
    sim = swarm(blobs, rounds=3)
    sim.run()
    node = sim.nodes[0]
    served = flatten(node.served_model())
    assert not torch.equal(served, flatten(node.model))  # sparse mixing: the served model is not the held one
    state = node.state_dict()
    fresh = swarm(blobs, rounds=3).nodes[0]
    assert not torch.equal(flatten(fresh.served_model()), served)
    fresh.load_state_dict(NodeState({k: v.clone() for k, v in state.tensors.items()}, dict(state.meta)))
    assert torch.equal(flatten(fresh.served_model()), served)
    assert fresh.evaluate() == node.evaluate()


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_quasi_global_momentum_steadies_and_speeds_the_held_models(blobs: PeerScript, seed: int) -> None:
    # The models the peers hold (not the served mean), SGD momentum 0.9: with the buffers half the round's movement
    # at each aggregation (`node.moments`), measured at round 5 +1.5 to +2.1 points of mean accuracy and smaller
    # largest drops from round 5 on (0.020-0.035 against 0.040-0.070) in these seeds.
    def run(rules: bool) -> list[RoundSummary]:
        sim = swarm(blobs, serving=False, seed=seed)
        for node in sim.nodes:
            node.trainer.moments.global_momentum = rules
        return sim.run().rounds

    with_rule, without = run(True), run(False)
    assert with_rule[4].mean_accuracy is not None and without[4].mean_accuracy is not None
    assert with_rule[4].mean_accuracy >= without[4].mean_accuracy + 0.01
    assert largest_drop(with_rule) < largest_drop(without)


# Ten overlapping classes in 16 dimensions, an MLP trained with Adam: on 4 peers holding 3 classes each, the peers
# that lack a class push it down with Adam's full-size steps on their tiny gradients (`node.moments`).
ADAM_SCRIPT = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def _blobs(n, seed):
    centers = torch.randn(10, 16, generator=torch.Generator().manual_seed(7))
    y = torch.arange(n) % 10
    return TensorDataset(centers[y] + torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), y)

def build_model(manifest, **kw):
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

def build_loaders(manifest, **kw):
    return DataLoader(_blobs(600, 0), batch_size=32, shuffle=True), DataLoader(_blobs(500, 1), batch_size=500)

def build_optimizer(manifest, model):
    return torch.optim.Adam(model.parameters(), lr=3e-3)
"""


def adam_swarm(tmp_path: Path, seed: int, floor: bool, rounds: int = 8) -> Simulator:
    path = tmp_path / "adam_blobs.py"
    path.write_text(ADAM_SCRIPT)
    script = load_script(path)
    manifest = build_manifest(
        name="adam-blobs", task_type="classification", input_shape="16", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="RotationTopology", training_params={"local_epochs": "4", "final_consensus_steps": "0"})
    sim = Simulator(script, manifest, SimConfig(peers=4, rounds=rounds, partition="classes:3", seed=seed))
    sim.build()
    for node in sim.nodes:
        node.trainer.moments.floor = floor
    return sim


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_floored_second_moments_lift_a_label_skewed_adam_swarm(tmp_path: Path, seed: int) -> None:
    # Measured at round 8: 81-86% with the floor, 76-80% without, in each of these seeds.
    floored, plain = adam_swarm(tmp_path, seed, True), adam_swarm(tmp_path, seed, False)
    with_floor, without = floored.run().rounds[-1].mean_accuracy, plain.run().rounds[-1].mean_accuracy
    assert with_floor is not None and without is not None
    assert with_floor >= without + 0.04
    # The run ended with an aggregation: every Adam second moment of every peer sits at or above its median.
    for node in floored.nodes:
        for state in node.optimizer.state.values():
            v = state["exp_avg_sq"]
            assert float(v.min()) >= float(v.flatten().median())


def test_floored_moments_survive_checkpoint_and_resume(tmp_path: Path) -> None:
    # The floor keeps no state of its own: the floored moments are the optimizer's, which the checkpoint holds.
    sim = adam_swarm(tmp_path, 1, True, rounds=2)
    sim.run()
    node = sim.nodes[0]
    state = node.state_dict()
    fresh = adam_swarm(tmp_path, 1, True, rounds=2).nodes[0]
    assert not fresh.optimizer.state
    fresh.load_state_dict(NodeState({k: v.clone() for k, v in state.tensors.items()}, dict(state.meta)))
    params = list(node.model.parameters())
    for mine, theirs in zip(params, fresh.model.parameters(), strict=True):
        assert torch.equal(fresh.optimizer.state[theirs]["exp_avg_sq"], node.optimizer.state[mine]["exp_avg_sq"])
        assert float(fresh.optimizer.state[theirs]["step"]) == float(node.optimizer.state[mine]["step"])
