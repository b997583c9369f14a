"""Compression and local DP inside the node: compressed swarms learn, lost deltas resync, the privacy budget stops
sharing, and the state survives checkpoints. Nodes run in lockstep over the in-memory transport."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.manifest.schema import CompressionSpec, Manifest, PrivacySpec
from quinkgl_cli.node.core import Node, NodeConfig
from quinkgl_cli.strategies.sharing import SharingPipeline
from quinkgl_cli.tensors import flatten
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

H = "sha256:" + "0" * 64
SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tiny models: intra-op threads only contend (a backward pass took 90 ms on a busy 2-core runner).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest(compression: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None, aggregation: str = "FedAvg",
             **training: Any) -> Manifest:
    return Manifest(
        name="sharing-test",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        task={"type": "classification", "input_shape": (4,), "output_shape": (3,), "label_type": "integer"},
        data_schema_hash=H,
        model={"framework": "pytorch", "arch_hash": H},
        aggregation={"name": aggregation},
        topology={"name": "FullTopology"},
        training=training,
        compression=compression or {},
        privacy=privacy or {},
    )


class Metrics:
    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    def on_round_end(self, round_idx: int, metrics: dict[str, Any]) -> None:
        self.rounds.append(metrics)


def make_node(net: MemoryNetwork, node_id: str, m: Manifest, label: int, seed: int = 0, hooks: Any = None) -> Node:
    torch.manual_seed(0)  # same initial weights everywhere, as the daemon does per swarm
    model = nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 4, generator=g) + label * 2.0
    y = torch.full((60,), label, dtype=torch.long)
    train = DataLoader(TensorDataset(x, y), batch_size=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    transport = MemoryTransport(net, node_id, swarm_id="s", arch_hash=H)
    node = Node(NodeConfig(node_id, rounds=50, seed=seed, noise_seed=seed), m, "sha256:swarm", model, train, None, opt,
                transport, hooks=hooks, clock=lambda: 0.0)
    transport.start_sync(node)
    return node


def run_round(net: MemoryNetwork, nodes: list[Node]) -> None:
    for n in nodes:
        n.begin_round()
        n.train_round()
    for n in nodes:
        n.share(0)
    net.deliver_all()
    for n in nodes:
        n.aggregate()
    for n in nodes:
        n.end_round()


def swarm(m: Manifest, count: int = 3) -> tuple[MemoryNetwork, list[Node], list[Metrics]]:
    net = MemoryNetwork(auto_deliver=False)
    hooks = [Metrics() for _ in range(count)]
    nodes = [make_node(net, f"p{i}", m, i, seed=i, hooks=hooks[i]) for i in range(count)]
    net.deliver_all()
    return net, nodes, hooks


def spread(nodes: list[Node]) -> float:
    flats = torch.stack([flatten(n.model) for n in nodes])
    return float((flats - flats.mean(0)).norm(dim=1).max())


# ------------------------------------------------------------------------------------------ pipeline alone
def test_pipeline_sanitizes_then_stops_sharing_when_the_budget_is_spent() -> None:
    pipe = SharingPipeline(CompressionSpec(), PrivacySpec(dp_epsilon=1.0, dp_total_epsilon=0.9), 10, noise_seed=0)
    assert not pipe.compress_sends and pipe.dp.max_releases == 1
    pipe.begin_training(torch.zeros(10))
    noised = pipe.end_training(torch.ones(10))
    assert noised is not None and not torch.equal(noised, torch.ones(10))
    pipe.begin_training(noised)
    assert pipe.end_training(noised + 1) is None and pipe.sharing_stopped
    state = pipe.state_dict()
    again = SharingPipeline(CompressionSpec(), PrivacySpec(dp_epsilon=1.0, dp_total_epsilon=0.9), 10)
    again.load_state_dict(state)
    assert again.sharing_stopped and again.dp.releases == 1
    with pytest.raises(ValueError, match="releases"):  # a DP node never restarts with a fresh budget
        SharingPipeline(CompressionSpec(), PrivacySpec(dp_epsilon=1.0), 10).load_state_dict({})


# ------------------------------------------------------------------------------------------ nodes
def test_compressed_swarm_reaches_consensus_with_a_fraction_of_the_bytes() -> None:
    plain_net, plain, _ = swarm(manifest())
    net, nodes, hooks = swarm(manifest({"top_k_ratio": 0.1, "quantize_bits": 8}))
    for _ in range(12):
        run_round(plain_net, plain)
        run_round(net, nodes)
    # Three label-disjoint peers (chance: 1/3): the compressed swarm learns about as well as the plain one.
    x = torch.cat([torch.randn(50, 4, generator=torch.Generator().manual_seed(9)) + 2.0 * c for c in range(3)])
    y = torch.arange(3).repeat_interleave(50)

    def accuracy(n: Node) -> float:
        return float((n.model(x).argmax(1) == y).float().mean())

    best_plain = max(accuracy(n) for n in plain)
    for n in nodes:
        assert accuracy(n) > 0.55 and accuracy(n) >= best_plain - 0.1
    assert spread(nodes) < 0.1  # and the peers agree
    sent = sum(n.transport.stats.bytes_sent for n in nodes)
    assert sent < 0.5 * sum(n.transport.stats.bytes_sent for n in plain)
    last = hooks[0].rounds[-1]
    assert last["compression_ratio_sent"] > 4 and last["delta_updates_sent"] == 2 and last["full_updates_sent"] == 0
    assert hooks[0].rounds[0]["full_updates_sent"] == 2  # first contact carries exact weights


def test_lost_delta_triggers_a_resync_and_full_weights(caplog: pytest.LogCaptureFixture) -> None:
    net, nodes, hooks = swarm(manifest({"top_k_ratio": 0.2}))
    run_round(net, nodes)
    net.block("p0", "p1")
    run_round(net, nodes)  # p0's delta to p1 is lost; p0 does not know
    net.unblock("p0", "p1")
    with caplog.at_level(logging.INFO, logger="quinkgl.node"):
        run_round(net, nodes)  # p1 refuses the next delta (wrong base) and asks for a resync
    assert hooks[1].rounds[-1]["updates_rejected"] == 1 and "p0" not in hooks[1].rounds[-1]["peer_ids"]
    assert hooks[0].rounds[-1]["resyncs"] == 1
    assert any("compression-resync" in r.getMessage() and "peer=p1" in r.getMessage() for r in caplog.records)
    run_round(net, nodes)
    assert hooks[0].rounds[-1]["full_updates_sent"] == 1 and hooks[0].rounds[-1]["delta_updates_sent"] == 1
    assert "p0" in hooks[1].rounds[-1]["peer_ids"]
    held = nodes[1].sharing.model_of("p0")
    assert held is not None and torch.equal(held[0], nodes[0].sharing.codec._tx["p1"].ref)  # type: ignore[union-attr]
    run_round(net, nodes)
    assert hooks[1].rounds[-1]["updates_rejected"] == 0


def test_stale_compressed_update_still_advances_the_delta_chain() -> None:
    """A delta too old to aggregate is still a link of its sender's chain: applied, it keeps the next delta valid."""
    net, nodes, hooks = swarm(manifest({"top_k_ratio": 0.2}, max_staleness=1), count=2)
    run_round(net, nodes)
    nodes[1].completed_round = 5  # p1 is 4 rounds ahead: p0's update of round 2 is stale there
    run_round(net, nodes)
    assert "p0" not in hooks[1].rounds[-1]["peer_ids"] and hooks[1].rounds[-1]["updates_dropped"] == 1
    run_round(net, nodes)  # the next delta fits what p1 holds: no refusal, no resync, no full weights
    assert [r["updates_rejected"] for r in hooks[1].rounds[1:]] == [0, 0]
    assert [(r["resyncs"], r["full_updates_sent"]) for r in hooks[0].rounds[1:]] == [(0, 0), (0, 0)]
    held = nodes[1].sharing.model_of("p0")
    assert held is not None and torch.equal(held[0], nodes[0].sharing.codec._tx["p1"].ref)  # type: ignore[union-attr]


def test_compressed_updates_carry_label_entropy_and_scaffold_variates() -> None:
    from quinkgl_cli.strategies.aggregation import CONTROL_VARIATE_KEY, LABEL_ENTROPY_KEY

    net, nodes, _ = swarm(manifest({"top_k_ratio": 0.1}, aggregation="Scaffold"))
    for _ in range(2):
        run_round(net, nodes)
    nodes[0].share(0)
    net.deliver_all()
    msg = nodes[1].inbox.snapshot()["p0"]
    assert msg.payload == b""  # applied on arrival; the inbox keeps the metadata only
    update = nodes[1].decode_update(msg)
    assert update.meta[LABEL_ENTROPY_KEY] == pytest.approx(nodes[0].label_entropy)
    sent = nodes[0].aggregator.extras_to_send()[CONTROL_VARIATE_KEY]
    assert torch.equal(update.extras[CONTROL_VARIATE_KEY], sent.reshape(-1))


def test_dp_noise_is_applied_accounted_and_the_budget_stops_sharing(caplog: pytest.LogCaptureFixture) -> None:
    m = manifest(privacy={"dp_epsilon": 4.0, "dp_clip_norm": 0.5, "dp_total_epsilon": 9.0})
    net, nodes, hooks = swarm(m)
    limit = nodes[0].sharing.dp.max_releases
    assert limit == 4  # RDP epsilon after 4 and 5 releases: 8.51, 9.73
    with caplog.at_level(logging.WARNING, logger="quinkgl.node"):
        for _ in range(limit + 1):
            run_round(net, nodes)
    eps = [r["dp_epsilon_spent"] for r in hooks[0].rounds]
    assert eps == sorted(eps) and eps[limit - 1] <= 9.0
    assert hooks[0].rounds[limit - 1]["dp_releases"] == limit
    assert hooks[0].rounds[-1]["sharing_stopped"] is True and hooks[0].rounds[-1]["updates_sent"] == 0
    assert hooks[0].rounds[-1]["dp_releases"] == limit  # the unaffordable round was not released
    assert any("dp-budget-exhausted" in r.getMessage() for r in caplog.records)


def test_checkpoint_carries_residuals_references_and_spent_budget() -> None:
    m = manifest({"top_k_ratio": 0.2}, {"dp_epsilon": 8.0})
    net, nodes, hooks = swarm(m)
    for _ in range(3):
        run_round(net, nodes)
    state = nodes[0].state_dict()
    assert {"sharing.dp.releases", "sharing.codec.tx/p1/ref", "sharing.codec.tx/p1/residual",
            "sharing.codec.rx/p1/model"} <= set(state.tensors)
    # p0 restarts from its checkpoint: its next updates are deltas the others accept.
    nodes[0].transport.stop_sync()
    net2_node = make_node(net, "p0", m, 0, seed=0, hooks=hooks[0])
    net2_node.load_state_dict(state)
    assert net2_node.sharing.dp.releases == 3
    net.deliver_all()
    nodes[0] = net2_node
    run_round(net, nodes)
    assert hooks[0].rounds[-1]["delta_updates_sent"] == 2 and hooks[0].rounds[-1]["full_updates_sent"] == 0
    assert hooks[1].rounds[-1]["updates_rejected"] == 0 and hooks[0].rounds[-1]["dp_releases"] == 4


def _dp_node(model: nn.Module, m: Manifest) -> Node:
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.arange(40) % 3), batch_size=10)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1)
    transport = MemoryTransport(MemoryNetwork(auto_deliver=False), "bn", swarm_id="s", arch_hash=H)
    return Node(NodeConfig("bn", rounds=5, noise_seed=0), m, "sha256:swarm", model, train, None, opt, transport,
                clock=lambda: 0.0)


def test_dp_refuses_models_with_float_buffers() -> None:
    """BatchNorm's running statistics come from the data and are no part of the clipped update: noised, the
    running variance goes negative (NaN in eval); shared as is, they leak. So DP refuses them, as Opacus does."""
    from quinkgl_cli.errors import ExitCode, NodeConfigError

    def bn_model() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    with pytest.raises(NodeConfigError, match=r"buffers \(1.running_mean, 1.running_var\)") as info:
        _dp_node(bn_model(), manifest(privacy={"dp_epsilon": 1.0}))
    assert info.value.code == ExitCode.NODE and "GroupNorm" in (info.value.hint or "")
    node = _dp_node(bn_model(), manifest())  # without DP a BatchNorm model is fine
    node.begin_round()
    node.train_round()
    assert node.evaluate() == (None, None) and bool(torch.isfinite(flatten(node.model)).all())


def test_dp_noises_only_parameters_that_train() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for q in model[0].parameters():
        q.requires_grad_(False)
    node = _dp_node(model, manifest(privacy={"dp_epsilon": 1.0, "dp_clip_norm": 0.1}))
    frozen = 4 * 8 + 8
    before = flatten(node.model)
    node.begin_round()
    node.train_round()
    after = flatten(node.model)
    assert torch.equal(after[:frozen], before[:frozen])  # the frozen layer is released as it was
    assert float((after[frozen:] - before[frozen:]).std()) > 0.5 * node.sharing.dp.sigma  # noised where it trains


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("aggregation", ["FedAvg", "FedAvgM"])
def test_gpu_models_share_with_dp_and_compression(aggregation: str) -> None:
    """Flat vectors come to the host (tensors.flatten): CPU noise, the codec and peers' CPU updates meet them there."""
    m = manifest({"top_k_ratio": 0.2, "quantize_bits": 8}, {"dp_epsilon": 4.0}, aggregation=aggregation)
    net, nodes, _ = swarm(m, count=2)
    for n in nodes:
        n.model.cuda()  # after the node was built: it trains where the model now lives
        assert flatten(n.model).device.type == "cpu"
    for _ in range(2):
        run_round(net, nodes)
    for n in nodes:
        assert next(n.model.parameters()).is_cuda and n.history[-1]["peers"] == 1
        assert bool(torch.isfinite(flatten(n.model)).all())


@pytest.mark.skipif(not SCRIPT.exists(), reason="digits peer script missing")
@pytest.mark.parametrize("mode", ["gossip", "fedavg"])
def test_compressed_swarm_on_non_iid_digits_learns(mode: str) -> None:
    """Gossip, and star FedAvg whose server broadcasts uncompressed while clients upload compressed deltas."""
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.node.script import load_script
    from quinkgl_cli.sim.simulator import Overrides, SimConfig, simulate

    script = load_script(SCRIPT)
    m = build_manifest(name="digits-sim", task_type="classification", input_shape="64", output_shape="10",
                       label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
                       aggregation="FedAvg", topology="FullTopology", training_params={"local_epochs": "2"})
    cfg: dict[str, Any] = {"peers": 5, "rounds": 8, "partition": "shards:2", "seed": 1}
    extra: dict[str, Any] = {"mode": "fedavg", "clients_per_round": 5} if mode == "fedavg" else {}
    compressed = simulate(script, m, SimConfig(overrides=Overrides(compression_params={"top_k_ratio": "0.1"}), **cfg, **extra))
    local = simulate(script, m, SimConfig(mode="local", **cfg))
    # Each peer holds about four of ten digits: alone it cannot pass ~40%; the compressed swarm must.
    assert compressed.final.mean_accuracy is not None and local.final.mean_accuracy is not None
    assert compressed.final.mean_accuracy > local.final.mean_accuracy + 0.15
