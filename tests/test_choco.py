"""CHOCO gossip (`strategies.choco`): consensus at a linear rate on compressed increments, where compressed averaging
without estimates stalls; estimates that agree bit for bit on both sides; resyncs; state and manifest round trips;
the simulator end to end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import CompressionSpec, Manifest
from quinkgl_cli.manifest.strategy_params import TopologyParams
from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.simulator import Overrides, SimConfig, Simulator, apply_overrides
from quinkgl_cli.strategies.choco import ChocoGossip, start_version
from quinkgl_cli.strategies.compression import StaleBase, compress_vector, decompress_vector
from quinkgl_cli.strategies.topology import ExpanderTopology
from quinkgl_cli.wire import WireError

SCRIPT = Path(__file__).resolve().parents[1] / "peer_scripts" / "digits_peer_script.py"
LIMIT = 1 << 24
TOPK = CompressionSpec(top_k_ratio=0.1, mode="choco")


def expander(n: int, fanout: int = 4) -> list[list[int]]:
    ids = [f"n{i:02d}" for i in range(n)]
    graph = []
    for me in ids:
        chosen = ExpanderTopology(TopologyParams(fanout=fanout), me, random.Random(0)).select(ids, 1)
        graph.append(sorted(ids.index(pid) for pid in chosen))
    assert all(i in graph[j] for i in range(n) for j in graph[i]), "the graph must be symmetric"
    return graph


def metropolis(graph: list[list[int]]) -> list[dict[int, float]]:
    return [{j: 1.0 / (1 + max(len(graph[i]), len(graph[j]))) for j in graph[i]} for i in range(len(graph))]


def consensus_error(x: list[torch.Tensor], target: torch.Tensor | None = None) -> float:
    """Squared distance of the nodes from their mean, or from ``target`` (the starting mean: CHOCO keeps it)."""
    mean = torch.stack(x).mean(0) if target is None else target
    return float(sum(torch.sum((v - mean) ** 2) for v in x))


def run_choco(x0: list[torch.Tensor], graph: list[list[int]], spec: CompressionSpec, gamma: float, steps: int) -> list[float]:
    """CHOCO-gossip on real payloads: increments encoded, sent through the wire format and applied by receivers.
    The error is the distance from the starting mean: the nodes must agree, and on the average they started with
    (a symmetric graph keeps it), not on any common point."""
    n = len(x0)
    x = [v.clone() for v in x0]
    nodes = [ChocoGossip(spec, torch.zeros_like(x0[0]), seed=i) for i in range(n)]
    w = metropolis(graph)
    target = torch.stack(x0).mean(0)
    errors = [consensus_error(x, target)]
    for step in range(steps):
        for i in range(n):
            nodes[i].advance(x[i], step)
        for i in range(n):
            for j in graph[i]:
                payload, kind = nodes[i].encode(f"n{j}", {"step": 0})
                assert kind == "delta"  # every estimate starts at the common zero and hears every increment
                nodes[j].receive(f"n{i}", payload, LIMIT, step)
        for i in range(n):
            diffs = {j: nodes[i].difference(f"n{j}") for j in graph[i]}
            x[i] = x[i] + gamma * sum(w[i][j] * diffs[j] for j in graph[i])  # type: ignore[operator]
        errors.append(consensus_error(x, target))
    return errors


def run_plain(x0: list[torch.Tensor], graph: list[list[int]], spec: CompressionSpec, gamma: float, steps: int) -> list[float]:
    """The same graph and compressor, without estimates: each node sends Q(x) and mixes Q(x_j) - Q(x_i)."""
    gen = torch.Generator().manual_seed(0)
    x = [v.clone() for v in x0]
    w = metropolis(graph)

    def q(v: torch.Tensor) -> torch.Tensor:
        tensors, layout = compress_vector(v, spec, "delta", gen)
        idx, values = decompress_vector(tensors, layout)
        out = torch.zeros_like(v)
        if idx is None:
            return values
        out[idx] = values
        return out

    errors = [consensus_error(x)]
    for _ in range(steps):
        sent = [q(v) for v in x]
        x = [x[i] + gamma * sum(w[i][j] * (sent[j] - sent[i]) for j in graph[i]) for i in range(len(x))]  # type: ignore[misc]
        errors.append(consensus_error(x))
    return errors


def test_choco_reaches_consensus_at_a_linear_rate_where_plain_compressed_averaging_stalls() -> None:
    n, dim, steps = 12, 60, 160
    gen = torch.Generator().manual_seed(1)
    x0 = [torch.randn(dim, generator=gen) for _ in range(n)]
    graph = expander(n)
    # top-10% keeps CHOCO stable up to a step of about 0.3 here (it diverges at 0.4: the theory's step shrinks with
    # the compressor's quality); 0.2 is inside.
    choco = run_choco(x0, graph, TOPK, gamma=0.2, steps=steps)
    plain = run_plain(x0, graph, TOPK, gamma=0.2, steps=steps)
    # A linear rate: every 20 steps divide the error by at least 5, all the way down to 1e-6 of where it started.
    windows = [choco[i + 20] / choco[i] for i in range(0, steps, 20)]
    assert max(windows) < 0.2, windows
    assert choco[-1] < 1e-6 * choco[0], choco[::20]
    # Without estimates, what top-k never picks never mixes: the error stalls far above.
    assert plain[-1] > 1e-2 * plain[0], plain[::20]
    assert min(plain[steps // 2:]) > 1e3 * choco[-1]


def test_choco_consensus_preserves_the_mean_and_quantizers_converge_too() -> None:
    n, dim = 10, 40
    gen = torch.Generator().manual_seed(2)
    x0 = [torch.randn(dim, generator=gen) for _ in range(n)]
    graph = expander(n)
    for spec in (CompressionSpec(quantize_bits=8, mode="choco"), CompressionSpec(qsgd_levels=15, mode="choco", block_size=8)):
        errors = run_choco(x0, graph, spec, gamma=0.5, steps=80)
        assert errors[-1] < 1e-6 * errors[0], (spec, errors[::10])


def test_estimates_agree_bit_for_bit_and_a_missed_increment_forces_a_full_resync() -> None:
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(200, generator=gen)
    a, b, c = (ChocoGossip(TOPK, start, seed=i) for i in range(3))
    x = start.clone()
    for step in range(3):
        x = x + 0.1 * torch.randn(200, generator=gen)
        a.advance(x, step)
        payload, kind = a.encode("b", {})
        assert kind == "delta"
        b.receive("a", payload, LIMIT, step)
        assert torch.equal(b.estimate("a"), a.own_estimate())
    # c never heard a: the chain has left the initial model, so a sends its estimate in full.
    a.advance(x, 3)
    a.encode("b", {})  # lost on the way to b
    full, kind = a.encode("c", {})
    assert kind == "full"
    c.receive("a", full, LIMIT, 3)
    assert torch.equal(c.estimate("a"), a.own_estimate())
    # b missed an increment: the next one is refused, a resync makes the one after full.
    a.advance(x + 1.0, 4)
    stale, _ = a.encode("b", {})
    with pytest.raises(StaleBase):
        b.receive("a", stale, LIMIT, 4)
    a.reset_peer("b")
    a.advance(x + 2.0, 5)
    again, kind = a.encode("b", {})
    assert kind == "full"
    b.receive("a", again, LIMIT, 5)
    assert torch.equal(b.estimate("a"), a.own_estimate())


def test_a_peer_that_started_elsewhere_is_refused_until_it_gets_the_full_estimate() -> None:
    a = ChocoGossip(TOPK, torch.zeros(50), seed=0)
    other = ChocoGossip(TOPK, torch.ones(50), seed=1)
    a.advance(torch.ones(50), 0)
    payload, kind = a.encode("other", {})
    assert kind == "delta" and start_version(torch.zeros(50)) != start_version(torch.ones(50))
    with pytest.raises(StaleBase):
        other.receive("a", payload, LIMIT, 0)


def test_reconstruct_and_choco_payloads_are_not_mixed_up() -> None:
    from quinkgl_cli.strategies.compression import UpdateCodec

    start = torch.zeros(64)
    choco = ChocoGossip(TOPK, start, seed=0)
    choco.advance(torch.ones(64), 0)
    payload, _ = choco.encode("r", {})
    with pytest.raises(WireError, match="mode 'choco'"):
        UpdateCodec(CompressionSpec(top_k_ratio=0.1), 64).receive("c", payload, LIMIT)
    plain = UpdateCodec(CompressionSpec(top_k_ratio=0.1), 64).encode("c", torch.ones(64)).payload
    with pytest.raises(WireError, match="mode 'reconstruct'"):
        ChocoGossip(TOPK, start, seed=1).receive("r", plain, LIMIT, 0)


def test_state_round_trip_continues_the_chain_and_foreign_state_is_refused() -> None:
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(100, generator=gen)
    a, b = ChocoGossip(TOPK, start, seed=0), ChocoGossip(TOPK, start, seed=1)
    for step in range(3):
        a.advance(start + step, step)
        b.receive("a", a.encode("b", {})[0], LIMIT, step)
        b.advance(start - step, step)
        a.receive("b", b.encode("a", {})[0], LIMIT, step)
    restored = ChocoGossip(TOPK, torch.zeros(100), seed=2)
    restored.load_state_dict(b.state_dict())
    assert torch.equal(restored.difference("a"), b.difference("a"))  # type: ignore[arg-type]
    a.advance(start + 7, 7)
    restored.receive("a", a.encode("b", {})[0], LIMIT, 7)  # continues the chain: no StaleBase
    restored.advance(start, 7)
    assert restored.encode("a", {})[1] == "delta"  # it remembers what a holds from it
    with pytest.raises(ValueError, match="does not fit"):
        ChocoGossip(TOPK, torch.zeros(99)).load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="unexpected entry"):
        ChocoGossip(TOPK, start).load_state_dict({**b.state_dict(), "bogus": torch.zeros(1)})


def test_estimates_of_silent_peers_are_dropped() -> None:
    start = torch.zeros(20)
    a, b = ChocoGossip(TOPK, start, seed=0, max_age=3), ChocoGossip(TOPK, start, seed=1)
    b.advance(torch.ones(20), 1)
    a.receive("b", b.encode("a", {})[0], LIMIT, 1)
    assert a.evict(4) == [] and a.peers() == ["b"]
    assert a.evict(5) == ["b"] and a.difference("b") is None


def test_expander_topology_is_fixed_symmetric_and_sparse() -> None:
    ids = [f"peer-{i}" for i in range(20)]
    graph = expander(20, fanout=3)
    assert all(2 <= len(nb) <= 4 for nb in graph)
    topo = ExpanderTopology(TopologyParams(fanout=3), "peer-5", random.Random(0))
    assert topo.select(ids, 1) == topo.select(list(reversed(ids)), 9)  # the same every round, whatever the order
    # A joining peer changes only its ring neighbours' edges.
    before = {pid: set(ExpanderTopology(TopologyParams(fanout=4), pid, random.Random(0)).select(ids, 1)) for pid in ids}
    after = {pid: set(ExpanderTopology(TopologyParams(fanout=4), pid, random.Random(0)).select(ids + ["new"], 1)) - {"new"}
             for pid in ids}
    assert sum(before[p] != after[p] for p in ids) <= 4


# ---------------------------------------------------------------------------------------------- manifest
def manifest(**compression: str) -> Manifest:
    script = load_script(SCRIPT)
    return build_manifest(
        name="digits-choco", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="ExpanderTopology", training_params={"local_epochs": "1", "final_consensus_steps": "2"},
        compression_params=compression)


def test_manifest_round_trip_and_refusals() -> None:
    m = manifest(top_k_ratio="0.01", mode="choco", consensus_step="0.7")
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again == m and again.compression.mode == "choco" and again.compression.consensus_step == 0.7
    for bad, match in (({"mode": "choco"}, "nothing while compression is off"),
                       ({"mode": "choco", "lossless": "zstd"}, "needs a lossy compressor"),
                       ({"top_k_ratio": "0.1", "consensus_step": "0.5"}, "needs mode=choco"),
                       ({"top_k_ratio": "0.1", "mode": "choco", "error_feedback": "false"}, "not apply to mode=choco"),
                       ({"top_k_ratio": "0.1", "mode": "choco", "consensus_step": "1.5"}, "consensus_step")):
        with pytest.raises(UsageError, match=match):
            manifest(**bad)
    for field, name, match in (("aggregation", "Krum", "needs an averaging rule"),
                               ("topology", "RandomTopology", "recipients must stay the same")):
        data = m.model_dump(mode="python")
        data[field] = {"name": name, "params": {}}
        with pytest.raises(ValueError, match=match):
            Manifest.model_validate(data)


def test_default_step_grows_with_the_kept_fraction_and_the_manifest_overrides_it() -> None:
    """2 sqrt(ratio) under top-k, capped at 0.5 (bench_choco: 0.05 at top-1% left every peer at local training's
    accuracy), 1 with quantizers alone; the step the consensus aggregator takes is the one the manifest resolves to."""
    from quinkgl_cli.node.core import build_aggregator
    from quinkgl_cli.strategies.choco import ConsensusStep, default_step

    def step(**kw: object) -> float:
        return default_step(CompressionSpec(mode="choco", **kw))  # type: ignore[arg-type]

    assert step(top_k_ratio=0.01) == pytest.approx(0.2)
    assert step(top_k_ratio=0.04) == pytest.approx(0.4)
    assert step(top_k_ratio=0.1) == step(top_k_ratio=0.5) == 0.5
    assert step(quantize_bits=8) == step(qsgd_levels=15) == 1.0
    assert step(top_k_ratio=0.01, consensus_step=0.05) == 0.05
    agg = build_aggregator(manifest(top_k_ratio="0.01", mode="choco"))
    assert isinstance(agg, ConsensusStep) and agg.gamma == pytest.approx(0.2)


def test_a_plain_manifest_keeps_its_canonical_bytes() -> None:
    """Manifests that do not use CHOCO serialize as before: their signatures and swarm ids do not change."""
    dumped = manifest(top_k_ratio="0.1").model_dump(mode="json")["compression"]
    assert "mode" not in dumped and "consensus_step" not in dumped


# ---------------------------------------------------------------------------------------------- simulator
def test_simulated_choco_swarm_keeps_estimates_in_step_and_learns_on_few_bytes() -> None:
    script = load_script(SCRIPT)
    base = manifest(top_k_ratio="0.1", mode="choco")
    train = Overrides(training_params={"local_epochs": "2"})
    sim = Simulator(script, base, SimConfig(peers=6, rounds=6, partition="shards:2", seed=0, overrides=train))
    sim.build()
    result = sim.run()
    nodes = {n.node_id: n for n in sim.nodes}
    checked = 0
    for node in sim.nodes:
        choco = node.sharing.choco
        assert choco is not None
        for sender in choco.peers():
            theirs = nodes[sender].sharing.choco
            assert theirs is not None and torch.equal(choco.estimate(sender), theirs.own_estimate())  # bit for bit
            checked += 1
    assert checked >= 2 * len(sim.nodes)
    metrics = [r for n in sim.nodes for r in n.history]
    assert sum(r.get("full_updates_sent", 0) for r in metrics) == 0  # all started from the same weights
    assert all(r.get("updates_rejected", 0) == 0 for r in metrics)
    assert min(r["compression_ratio_sent"] for r in metrics if r.get("delta_updates_sent")) > 3
    alone = Simulator(script, base, SimConfig(peers=6, rounds=6, partition="shards:2", seed=0, mode="local",
                                              overrides=train)).run()
    assert result.final is not None and alone.final is not None
    assert result.final.mean_accuracy > alone.final.mean_accuracy + 0.1


def test_simulator_refuses_choco_outside_gossip_mode() -> None:
    script = load_script(SCRIPT)
    with pytest.raises(UsageError, match="choco"):
        Simulator(script, manifest(top_k_ratio="0.1", mode="choco"), SimConfig(peers=3, rounds=1, mode="pairwise"))
    assert apply_overrides(manifest(top_k_ratio="0.1", mode="choco"), Overrides()).compression.mode == "choco"


def test_node_checkpoint_carries_the_estimates_and_a_restarted_peer_continues_its_chains(tmp_path: Path) -> None:
    from quinkgl_cli.node.checkpoint import CheckpointStore
    from tests.test_sharing import make_node, run_round, swarm
    from tests.test_sharing import manifest as sharing_manifest

    m = sharing_manifest({"top_k_ratio": 0.2, "mode": "choco"})
    net, nodes, hooks = swarm(m)
    for _ in range(3):
        run_round(net, nodes)
    state = nodes[0].state_dict()
    assert {"sharing.choco.own/vec", "sharing.choco.peer/p1/vec", "sharing.choco.sent/p1"} <= set(state.tensors)
    # Through the checkpoint's own bytes (safetensors + JSON), as a daemon writes and reads it.
    store = CheckpointStore(tmp_path)
    store.save(state)
    latest = store.latest()
    assert latest is not None
    state = latest[1]
    nodes[0].transport.stop_sync()
    restarted = make_node(net, "p0", m, 0, seed=0, hooks=hooks[0])
    restarted.load_state_dict(state)
    assert restarted.sharing.choco is not None and nodes[1].sharing.choco is not None
    assert torch.equal(restarted.sharing.choco.own_estimate(), nodes[1].sharing.choco.estimate("p0"))  # type: ignore[arg-type]
    net.deliver_all()
    nodes[0] = restarted
    run_round(net, nodes)
    assert hooks[0].rounds[-1]["delta_updates_sent"] == 2 and hooks[0].rounds[-1]["full_updates_sent"] == 0
    assert all(h.rounds[-1]["updates_rejected"] == 0 for h in hooks)
