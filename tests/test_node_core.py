"""Node round logic over the in-memory transport, driven in lockstep (no event loop, no sockets)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli import wire
from quinkgl_cli.events import FIELDS_ATTR
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodeConfig, NodeState
from quinkgl_cli.tensors import flatten, load_flat
from quinkgl_cli.transport.base import ModelReceived, PeerInfo
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

H = "sha256:" + "0" * 64


def manifest(**training: Any) -> Manifest:
    return Manifest(
        name="core-test",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        task={"type": "classification", "input_shape": (4,), "output_shape": (3,), "label_type": "integer"},
        data_schema_hash=H,
        model={"framework": "pytorch", "arch_hash": H},
        aggregation={"name": "FedAvg"},
        topology={"name": "FullTopology"},
        training=training,
    )


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name == self.fail:
            raise RuntimeError(f"boom in {name}")

    def on_round_end(self, round_idx: int, metrics: dict[str, Any]) -> None:
        self._rec("on_round_end", round_idx, metrics)

    def on_peer_discovered(self, peer_id: str) -> None:
        self._rec("on_peer_discovered", peer_id)

    def on_aggregation_done(self, peer_ids: list[str], sample_count: int) -> None:
        self._rec("on_aggregation_done", peer_ids, sample_count)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


def data(label: int, n: int = 30, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) + label * 2.0
    y = torch.full((n,), label, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=10), DataLoader(TensorDataset(x, y), batch_size=30)


def make_node(net: MemoryNetwork, node_id: str, m: Manifest, label: int, hooks: Any = None, seed: int = 0,
              rounds: int = 3, noise_seed: int | None = None, spectral_every: int = 5) -> Node:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    train, val = data(label, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    transport = MemoryTransport(net, node_id, swarm_id="s", arch_hash=H)
    config = NodeConfig(node_id, rounds=rounds, seed=seed, noise_seed=noise_seed, spectral_every=spectral_every)
    node = Node(config, m, "sha256:swarm", model, train, val, opt, transport, hooks=hooks, clock=lambda: 0.0)
    transport.start_sync(node)
    return node


def run_round(net: MemoryNetwork, nodes: list[Node]) -> None:
    for n in nodes:
        n.begin_round()
        n.train_round()
    for step in range(nodes[0].gossip_steps):
        for n in nodes:
            n.share(step)
        net.deliver_all()
        for n in nodes:
            n.aggregate()
    for n in nodes:
        n.evaluate()
        n.end_round()


def test_three_nodes_discover_exchange_and_converge_to_consensus() -> None:
    net = MemoryNetwork(auto_deliver=False)
    hooks = [Recorder() for _ in range(3)]
    nodes = [make_node(net, f"p{i}", manifest(), i, hooks[i], seed=i) for i in range(3)]
    net.deliver_all()
    for i, n in enumerate(nodes):
        assert sorted(n.known_peers) == sorted(f"p{j}" for j in range(3) if j != i)
        assert sorted(a[0] for a in hooks[i].named("on_peer_discovered")) == sorted(n.known_peers)
    for _ in range(3):
        run_round(net, nodes)
    # FullTopology + FedAvg with equal sample counts: after each exchange every node holds the same average.
    flats = [flatten(n.model) for n in nodes]
    assert torch.allclose(flats[0], flats[1], atol=1e-6) and torch.allclose(flats[0], flats[2], atol=1e-6)
    for i, n in enumerate(nodes):
        agg = hooks[i].named("on_aggregation_done")
        assert len(agg) == 3 and sorted(agg[0][0]) == sorted(n.known_peers) and agg[0][1] == 90
        ends = hooks[i].named("on_round_end")
        assert [e[0] for e in ends] == [1, 2, 3]
        m = ends[-1][1]
        assert m["peers"] == 2 and m["samples"] == 30 and m["bytes_received"] > 0 and m["bytes_sent"] > 0
        assert m["loss"] is not None and m["val_accuracy"] is not None
        assert n.finished()


def test_hook_exception_is_logged_and_node_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork(auto_deliver=False)
    bad = Recorder(fail="on_aggregation_done")
    nodes = [make_node(net, "a", manifest(), 0, bad), make_node(net, "b", manifest(), 1, seed=1)]
    net.deliver_all()
    with caplog.at_level(logging.ERROR, logger="quinkgl.node"):
        run_round(net, nodes)
        run_round(net, nodes)
    failures = [r for r in caplog.records if r.getMessage().startswith("hook-failed")]
    assert len(failures) == 2 and "RuntimeError: boom in on_aggregation_done" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "boom in on_aggregation_done" in caplog.text  # the traceback rides along
    assert [a[0] for a in bad.named("on_round_end")] == [1, 2]


def forged(node: Node, sender: str, round_: int, flat: torch.Tensor, samples: int, payload: bytes | None = None) -> ModelReceived:
    ref = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    load_flat(ref, flat)
    if payload is None:
        payload = wire.encode({s.name: ref.state_dict()[s.name] for s in node.specs}, meta={"step": 0})
    return ModelReceived(sender, round_, payload, samples, "qgl-tensors/1", {"step": 0}, 0.0)


def test_bad_stale_and_greedy_updates(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(max_staleness=1), 0, rounds=10)
    node.completed_round = 4
    node.begin_round()  # round 5
    zero = torch.zeros_like(flatten(node.model))
    nan = zero.clone()
    nan[0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="quinkgl.node"):
        node.on_model(forged(node, "old", 3, zero, 10))  # 5 - 3 > max_staleness 1
        node.on_model(forged(node, "nan", 5, nan, 10))
        node.on_model(forged(node, "junk", 5, zero, 10, payload=b"QGLT garbage"))
        node.on_model(forged(node, "greedy", 5, zero, 2**40))
        outcome = node.aggregate()
    assert outcome is not None and outcome.peers == ["greedy"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("update-dropped peer=old" in m and "stale" in m for m in messages)
    assert any('update-dropped peer="nan"' in m and "NaN" in m for m in messages)  # quoted: it reads as a number
    assert any("update-dropped peer=junk" in m for m in messages)
    # Dropped updates are gone: nothing is retried at the next aggregation.
    caplog.clear()
    assert node.aggregate() is None
    assert not [r for r in caplog.records if "update-dropped" in r.getMessage()]


def test_greedy_sample_count_is_bounded_among_three() -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(), 0)
    node.begin_round()
    d = flatten(node.model).numel()
    # Models one norm apart: within the poison guard's range, so only the weight cap acts.
    load_flat(node.model, torch.ones(d))
    node.on_model(forged(node, "honest", 1, torch.ones(d), 30))
    node.on_model(forged(node, "greedy", 1, torch.full((d,), 2.0), 2**40))
    node.aggregate()
    # max_weight_ratio 2 with 3 updates caps "greedy" at 2/3 of the average, whatever it claims.
    assert float(flatten(node.model).max()) == pytest.approx(1 + 2 / 3, abs=1e-5)


def test_the_served_model_averages_clipped_updates_never_the_raw_ones() -> None:
    """A scaled-up update the poison guard clips must not reach the served model (evaluation, final model) raw."""
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(), 0)
    node.begin_round()
    d = flatten(node.model).numel()
    load_flat(node.model, torch.ones(d))
    node.share()  # the served mean includes this peer's own model as it shared it
    for name in ("h1", "h2"):
        node.on_model(forged(node, name, 1, torch.ones(d) * 1.01, 30))
    node.on_model(forged(node, "x50", 1, torch.ones(d) * 50.0, 30))  # inside the refusal range: clipped, used
    outcome = node.aggregate()
    assert outcome is not None and "x50" in outcome.peers
    served = flatten(node.served_model())
    assert float(served.max()) < 3.0, "the raw x50 model leaked into the served average"


def test_a_peer_whose_update_is_refused_leaves_the_served_model() -> None:
    """A model an aggregation used stays in the served average for rounds, unless the peer's next update is refused
    (an untrained or zeroed model after a poisoned one): then it leaves at once."""
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(), 0)
    node.begin_round()
    d = flatten(node.model).numel()
    load_flat(node.model, torch.ones(d))
    node.share()
    for name, value in (("h1", 1.01), ("h2", 0.99), ("x", 2.5)):  # x: under the norm cap, clipped to one norm away, used
        node.on_model(forged(node, name, 1, torch.full((d,), value), 30))
    assert "x" in node.aggregate().peers  # type: ignore[union-attr]
    assert float(flatten(node.served_model()).max()) > 1.1
    for name, value in (("h1", 1.0), ("h2", 1.0), ("x", 0.0)):  # zeros: far below the round's norms
        node.on_model(forged(node, name, 1, torch.full((d,), value), 30))
    outcome = node.aggregate()
    assert outcome is not None and outcome.rejected == ["x"]
    assert float(flatten(node.served_model()).max()) < 1.05, "the refused peer's older model is still served"


def test_copies_echoes_and_replays_are_dropped_on_arrival() -> None:
    """Identities cost nothing: one that forwards an honest peer's model, sends this node its own model back, or
    sends the same model round after round adds no training, only weight (`node.copies`)."""
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(), 0)
    node.on_peer_discovered(PeerInfo("h1", "00", None, 0.0))
    sent: list[Any] = []
    node.transport.send_model = lambda peer, update: sent.append(update)  # type: ignore[method-assign]
    node.begin_round()
    node.share()
    d = flatten(node.model).numel()
    honest = forged(node, "h1", 1, torch.full((d,), 0.5), 30)
    node.on_model(forged(node, "sq", 1, torch.zeros(d), 30, payload=bytes(sent[0].payload)))  # our own model back
    node.on_model(honest)
    node.on_model(forged(node, "sq2", 1, torch.zeros(d), 30, payload=bytes(honest.payload)))  # h1's, forwarded
    node.on_model(forged(node, "h1", 1, torch.zeros(d), 30, payload=bytes(honest.payload)))  # a resend: kept
    assert node.pending_senders() == {"h1"} and node.inbox.dropped == 2
    node.aggregate()
    node.end_round()
    node.begin_round()
    node.on_model(forged(node, "h1", 2, torch.zeros(d), 30, payload=bytes(honest.payload)))  # round 1's, again
    assert node.pending_senders() == set() and node.inbox.dropped == 1


def test_newest_update_per_sender_wins() -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(), 0)
    node.begin_round()
    d = flatten(node.model).numel()
    node.on_model(forged(node, "x", 1, torch.ones(d), 30))
    node.on_model(forged(node, "x", 0, torch.full((d,), 5.0), 30))  # older: ignored
    assert node.pending_senders() == {"x"}
    load_flat(node.model, torch.zeros(d))
    node.aggregate()
    assert float(flatten(node.model).max()) == pytest.approx(0.5, abs=1e-5)


def test_gossip_steps_exchange_several_times_per_round() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest(gossip_steps=2)
    rec = Recorder()
    nodes = [make_node(net, "a", m, 0, rec), make_node(net, "b", m, 1, seed=1)]
    net.deliver_all()
    run_round(net, nodes)
    assert len(rec.named("on_aggregation_done")) == 2


def test_lone_node_trains_without_peers() -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "alone", manifest(), 0)
    run_round(net, [node])
    assert node.completed_round == 1 and node.history[0]["peers"] == 0 and node.history[0]["loss"] is not None


def test_state_roundtrip_restores_model_optimizer_rng_and_round() -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "a", manifest(), 0)
    run_round(net, [node])
    state = node.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.tensors.values())
    torch.manual_seed(123)
    expected_rand = torch.rand(3)
    torch.manual_seed(123)
    state = node.state_dict()
    other = make_node(MemoryNetwork(auto_deliver=False), "a", manifest(), 0, seed=9)
    other.load_state_dict(NodeState(dict(state.tensors), dict(state.meta)))
    assert torch.equal(flatten(other.model), flatten(node.model))
    assert other.completed_round == 1 and other.history == node.history
    mom_a = node.optimizer.state_dict()["state"][0]["momentum_buffer"]
    mom_b = other.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(mom_a, mom_b)
    assert torch.equal(torch.rand(3), expected_rand)
    other.begin_round()
    assert other.round == 2


def with_aggregation(name: str, **params: Any) -> Manifest:
    base = manifest()
    return base.model_copy(update={"aggregation": base.aggregation.model_copy(update={"name": name, "params": params})})


def test_fedprox_proximal_term_changes_local_training() -> None:
    def trained(mu: float) -> tuple[torch.Tensor, torch.Tensor]:
        node = make_node(MemoryNetwork(auto_deliver=False), "a", with_aggregation("FedProx", mu=mu), 1, seed=3)
        start = flatten(node.model)
        node.begin_round()
        node.train_round()
        return start, flatten(node.model)

    start, plain = trained(0.0)
    start_again, prox = trained(5.0)
    assert torch.equal(start, start_again)
    assert not torch.allclose(plain, prox)
    assert float((prox - start).norm()) < float((plain - start).norm())  # the term pulls toward the round's start


@pytest.mark.parametrize("aggregation", ["FedAvgM", "Scaffold"])
def test_aggregator_state_survives_a_node_checkpoint(aggregation: str) -> None:
    """A fresh node that loads the state continues exactly as the original: momentum / control variates included."""
    net = MemoryNetwork(auto_deliver=False)
    m = with_aggregation(aggregation)
    a, b = make_node(net, "a", m, 0, rounds=10), make_node(net, "b", m, 1, seed=1, rounds=10)
    net.deliver_all()
    for _ in range(2):
        run_round(net, [a, b])
    state = a.aggregator.state_dict()
    assert state and all(float(t.abs().sum()) > 0 for t in state.values())
    fresh = make_node(MemoryNetwork(auto_deliver=False), "a", m, 0, rounds=10)  # same data, untrained
    live = a.state_dict()  # views of a's live tensors: copy them, as writing a checkpoint does
    saved = NodeState({k: v.clone() for k, v in live.tensors.items()}, dict(live.meta))
    without = NodeState({k: v.clone() for k, v in live.tensors.items() if not k.startswith("aggregator.")},
                        dict(live.meta))
    fresh.load_state_dict(saved)
    peer = b.encode_update()
    results = []
    for node in (a, fresh):
        node.begin_round()
        node.train_round()
        node.on_model(ModelReceived("b", node.round, peer.payload, peer.sample_count, "qgl-tensors/1", peer.meta, 0.0))
        assert node.aggregate() is not None
        node.end_round()
        results.append((flatten(node.model), node.aggregator.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() == state.keys()
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in state)
    # And the state mattered: a node that did not load it ends elsewhere.
    blank = make_node(MemoryNetwork(auto_deliver=False), "a", m, 0, rounds=10)
    blank.load_state_dict(without)
    blank.begin_round()
    blank.train_round()
    blank.on_model(ModelReceived("b", blank.round, peer.payload, peer.sample_count, "qgl-tensors/1", peer.meta, 0.0))
    blank.aggregate()
    assert not torch.allclose(flatten(blank.model), results[0][0])


def test_fingerprints_reach_affinity_topology_and_entropy_rides_on_updates() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest().model_copy(update={"topology": manifest().topology.model_copy(update={"name": "AffinityTopology"})})
    nodes = [make_node(net, f"p{i}", m, i, seed=i) for i in range(3)]
    net.deliver_all()
    for n in nodes:
        assert n.topology.own is not None
        assert set(n.topology.fingerprints) == set(n.known_peers)
        assert n.label_entropy == pytest.approx(0.0)  # one class per peer in these shards
        assert n.encode_update().meta["label_entropy"] == n.label_entropy


def test_a_fingerprint_is_encoded_once_for_every_peer_it_goes_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node encodes its fingerprint body once; every peer still reads the body the node holds."""
    from quinkgl_cli.strategies.fingerprint import parse_fingerprint
    from quinkgl_cli.transport import common

    encodings: list[dict[str, Any]] = []
    encode = common.encode_body

    def counted(body: dict[str, Any], *args: Any, **kwargs: Any) -> bytes:
        encodings.append(body)
        return encode(body, *args, **kwargs)

    monkeypatch.setattr(common, "encode_body", counted)
    net = MemoryNetwork(auto_deliver=False)
    m = manifest().model_copy(update={"topology": manifest().topology.model_copy(update={"name": "AffinityTopology"})})
    nodes = [make_node(net, f"p{i}", m, i, seed=i) for i in range(3)]
    net.deliver_all()
    assert encodings == [n.fingerprint_body for n in nodes]  # not one a discovered peer (6 discoveries)
    for n in nodes:
        assert len(n.topology.fingerprints) == 2
        for other in nodes:
            if other is not n:
                assert other.fingerprint_body is not None
                assert n.topology.fingerprints[other.node_id] == parse_fingerprint(other.fingerprint_body)


def test_fingerprint_noise_is_secret_unless_a_noise_seed_is_set() -> None:
    """The daemon derives config.seed from public ids: the moment noise must not come from it."""
    def moments(noise_seed: int | None) -> str:
        node = make_node(MemoryNetwork(auto_deliver=False), "a", manifest(), 0, seed=5, noise_seed=noise_seed)
        assert node.fingerprint_body is not None
        return str(node.fingerprint_body["moments"])

    assert moments(None) != moments(None)
    assert moments(7) == moments(7) != moments(8)


def test_label_entropy_stays_home_when_fingerprints_are_off(caplog: pytest.LogCaptureFixture) -> None:
    base = manifest()
    m = base.model_copy(update={"aggregation": base.aggregation.model_copy(update={"name": "EntropyWeightedAvg"}),
                                "privacy": base.privacy.model_copy(update={"fingerprint": False})})
    net = MemoryNetwork(auto_deliver=False)
    nodes = [make_node(net, f"p{i}", m, i, seed=i) for i in range(2)]
    net.deliver_all()
    for n in nodes:
        assert n.label_entropy is None and n.fingerprint_body is None
        assert "label_entropy" not in n.encode_update().meta
    with caplog.at_level(logging.INFO, logger="quinkgl.node"):
        run_round(net, nodes)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("aggregated models")]
    assert len(lines) == 2 and all("no label_entropy from" in ln and "fallback_weight" in ln for ln in lines)


@pytest.mark.parametrize("topology,edges,lambda2,gap,mixing", [
    # Ring of 4, fanout 2: each peer sees its two edges and, through what its neighbours name, the other two (C4).
    ("RingTopology", 4, 2.0, 2 / 3, math.log(4) / (2 / 3)),
    # Everyone to everyone: K4 (lambda_2 = n, gap 1), not the star of its own exchanges.
    ("FullTopology", 6, 4.0, 1.0, math.log(4)),
])
def test_running_nodes_log_the_spectrum_of_the_gossip_graph_they_observe(
        caplog: pytest.LogCaptureFixture, topology: str, edges: int, lambda2: float, gap: float, mixing: float) -> None:
    base = manifest()
    m = base.model_copy(update={"topology": base.topology.model_copy(update={"name": topology, "params": {"fanout": 2}})})
    net = MemoryNetwork(auto_deliver=False)
    hooks = [Recorder() for _ in range(4)]
    nodes = [make_node(net, f"p{i}", m, i % 3, hooks[i], seed=i, rounds=4, spectral_every=2) for i in range(4)]
    net.deliver_all()
    with caplog.at_level(logging.INFO, logger="quinkgl.node"):
        for _ in range(2):
            run_round(net, nodes)
    lines = [r for r in caplog.records if r.getMessage().startswith("spectral ")]
    assert sorted(r.node for r in lines) == ["p0", "p1", "p2", "p3"] and {r.round for r in lines} == {2}  # type: ignore[attr-defined]
    expected = {"window": 10, "nodes": 4, "edges": edges, "lambda2": round(lambda2, 4), "gap": round(gap, 4),
                "mixing_bound": round(mixing, 2), "connected": True}
    assert all(getattr(r, FIELDS_ATTR) == expected for r in lines)
    for h in hooks:
        first, second = (args[1] for args in h.named("on_round_end"))
        assert not any(k.startswith("spectral_") for k in first)
        assert second["spectral_round"] == 2 and second["spectral_nodes"] == 4 and second["spectral_edges"] == edges
        assert second["spectral_lambda2"] == pytest.approx(lambda2, abs=1e-4)
        assert second["spectral_gap"] == pytest.approx(gap, abs=1e-4) and second["spectral_connected"] is True
        assert second["spectral_mixing_bound"] == pytest.approx(mixing, abs=0.01)


def test_named_recipients_only_count_among_known_peers() -> None:
    net = MemoryNetwork(auto_deliver=False)
    me, _ = make_node(net, "me", manifest(), 0), make_node(net, "x", manifest(), 1, seed=1)
    net.deliver_all()
    me.begin_round()
    d = flatten(me.model).numel()
    fake = forged(me, "x", 1, torch.zeros(d), 30)
    me.on_model(ModelReceived(fake.sender, 1, fake.payload, 30, fake.encoding, {"step": 0, "gossip_to": "me,ghost1,ghost2"}, 0.0))
    me.aggregate()
    report = me.graph.monitor.report(1)
    assert report.n == 2 and report.edges == 1  # x - me; the invented peers are ignored


def test_affinity_grades_collaborators_by_how_close_their_updates_came() -> None:
    base = manifest()
    m = base.model_copy(update={"topology": base.topology.model_copy(update={"name": "AffinityTopology"})})
    net = MemoryNetwork(auto_deliver=False)
    me = make_node(net, "me", m, 0)
    me.begin_round()
    flat = flatten(me.model)
    me.on_model(forged(me, "near", 1, flat + 0.01, 30))
    me.on_model(forged(me, "mid", 1, flat - 0.02, 30))
    me.on_model(forged(me, "far", 1, flat + 0.5, 30))  # far, but not so large as to pass for noise
    assert me.aggregate() is not None
    edges = me.topology.edges  # type: ignore[attr-defined]
    # Every update was used by FedAvg: a used/unused bit would give all three 1.0.
    assert edges["near"].weight > 0.5 > edges["far"].weight and edges["far"].weight < 0.15
    assert edges["mid"].weight > edges["far"].weight


def test_manifest_round_limit_caps_rounds() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest().model_copy(update={"round_limit": 2})
    assert make_node(net, "a", m, 0, rounds=5).rounds == 2
    assert make_node(net, "b", m, 0, rounds=1).rounds == 1
    assert make_node(net, "c", manifest(), 0, rounds=None).rounds is None  # type: ignore[arg-type]


def test_peer_far_behind_catches_up_with_the_swarm_majority(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork(auto_deliver=False)
    nodes = [make_node(net, f"p{i}", manifest(max_staleness=2), i, seed=i, rounds=50) for i in range(4)]
    net.deliver_all()
    late = nodes[0]
    model = flatten(late.model)

    def trained(peer: int, r: int) -> torch.Tensor:  # each peer's model of each round its own (copies are dropped)
        return model + 1e-4 * (peer + 4 * r)

    # Peers count for the quorum once they delivered valid updates in HISTORY_ROUNDS (3) rounds of ours.
    for r in range(3):
        assert late.begin_round() == r + 1
        late.on_model(forged(late, "p1", 20 + r, trained(1, r), 30))
        late.on_model(forged(late, "p2", 21 + r, trained(2, r), 30))
        late.on_model(forged(late, "p3", 10_000, trained(3, r), 30))  # one peer lying about its round
        late.aggregate()  # rounds count once the updates decoded and validated
        late.end_round()
    with caplog.at_level(logging.INFO, logger="quinkgl.node"):
        # 10000 is past the round limit (50): no claim at all. Two of three say 22 or more.
        assert late.begin_round() == 22
    assert any(r.getMessage().startswith("caught-up from_round=4 to_round=22") for r in caplog.records)
    # A minority ahead does not move it.
    other = nodes[1]
    for r in range(3):
        other.begin_round()
        other.on_model(forged(other, "p3", 10_000, trained(3, r), 30))
        other.aggregate()
        other.end_round()
    assert other.begin_round() == 4


def test_junk_or_a_single_peer_cannot_move_the_round_clock() -> None:
    """The attack: one peer claiming round 10000 ended another's training (round 2 -> 15 of 15)."""
    net = MemoryNetwork(auto_deliver=False)
    me, _ = make_node(net, "me", manifest(), 0, rounds=15), make_node(net, "liar", manifest(), 1, seed=1, rounds=15)
    net.deliver_all()
    run_round(net, [me])
    d = flatten(me.model).numel()
    me.on_model(forged(me, "liar", 10_000, torch.zeros(d), 30, payload=b"QGLT garbage"))
    me.aggregate()
    assert me.begin_round() == 2  # junk does not count
    me.end_round()
    me.on_model(forged(me, "liar", 10_000, torch.zeros(d), 30))
    me.aggregate()
    assert me.begin_round() == 3  # a valid update, but one peer is no quorum
    me.end_round()
    # Three known peers: two junk liars are not a majority of validated rounds either.
    for name in ("liar2", "honest"):
        make_node(net, name, manifest(), 2, seed=2, rounds=15)
    net.deliver_all()
    me.on_model(forged(me, "liar", 10_000, torch.zeros(d), 30, payload=b"QGLT garbage"))
    me.on_model(forged(me, "liar2", 10_000, torch.zeros(d), 30, payload=b"QGLT garbage"))
    me.on_model(forged(me, "honest", 4, torch.zeros(d), 30))
    me.aggregate()
    assert me.begin_round() == 4 and not me.finished()


def test_honest_catch_up_through_the_round_loop() -> None:
    """A peer restarted far behind reaches its swarm's round by ordinary rounds (share, aggregate, begin_round)."""
    net = MemoryNetwork(auto_deliver=False)
    nodes = [make_node(net, f"p{i}", manifest(max_staleness=1), i % 3, seed=i, rounds=50) for i in range(4)]
    net.deliver_all()
    for n in nodes[1:]:
        n.completed_round = 30
    # Its peers count for the quorum once they have a history: valid updates in 3 of its rounds.
    for expected in ([1, 31, 31, 31], [2, 32, 32, 32], [3, 33, 33, 33]):
        run_round(net, nodes)
        assert [n.completed_round for n in nodes] == expected
    run_round(net, nodes)
    # It runs the round the others have reached (33, within max_staleness of their 34): exchanges count again.
    assert [n.completed_round for n in nodes] == [33, 34, 34, 34]
    assert all(n.history[-1]["peers"] == 3 for n in nodes)


def test_repeated_drops_are_logged_once_per_peer_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork(auto_deliver=False)
    node = make_node(net, "me", manifest(max_staleness=0), 0, rounds=10)
    node.completed_round = 5
    node.begin_round()
    d = flatten(node.model).numel()
    with caplog.at_level(logging.WARNING, logger="quinkgl.node"):
        for r in range(3):
            node.on_model(forged(node, "old", r, torch.zeros(d), 10))
    assert len([r for r in caplog.records if "update-dropped" in r.getMessage()]) == 1


def test_round_traffic_is_counted_end_to_end() -> None:
    """What moves between rounds (a send finishing after its round closed, an update arriving while the node waits
    for its next round) counts in the next round, so the rounds add up to the recorded totals a checkpoint keeps."""
    from quinkgl_cli.node.metrics import RoundRecorder
    from quinkgl_cli.transport.base import TransportStats

    stats = TransportStats(bytes_sent=5)  # before round 1 (hellos while waiting for --min-peers)
    recorder = RoundRecorder()
    rounds = []
    for r in (1, 2):
        recorder.begin(float(r))
        stats.bytes_sent += 100
        stats.bytes_received += 70
        rounds.append(recorder.finish(r, r + 0.5, stats, 1, 0, 10, {}, {}))
        stats.bytes_sent += 7  # after the round closed
    assert [m.bytes_sent for m in rounds] == [105, 107]
    assert recorder.recorded()["bytes_sent"] == 212 and recorder.totals(stats)["bytes_sent"] == 219
    assert recorder.state_dict()["totals"]["bytes_sent"] == 212
    again = RoundRecorder()
    again.load_state_dict(recorder.state_dict())
    assert again.recorded()["bytes_sent"] == 212 and again.recorded()["bytes_received"] == 140


def test_malformed_control_messages_are_reported_once_per_peer_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    """Control messages are not rate-limited for trusted peers: a member sending malformed Cyclon shuffles or data
    fingerprints made one WARNING line per message (`message-dropped`, `fingerprint-rejected`). Once per peer and
    kind now, the repeats at DEBUG; again after the peer left and came back."""
    m = manifest()
    for name, kind, body in (("CyclonTopology", "cyclon-shuffle", "entries"), ("AffinityTopology", "fingerprint", "bogus")):
        spec = m.model_copy(update={"topology": m.topology.model_copy(update={"name": name, "params": {}})})
        node = make_node(MemoryNetwork(auto_deliver=False), "me", spec, 0)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for i in range(50):
                node.on_message("m", kind, {body: f"bad{i}"})
            node.on_peer_lost(PeerInfo("m", "00" * 32, None, 0.0))
            node.on_message("m", kind, {body: "bad"})
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 2 and all(w.startswith("message-dropped peer=m") for w in warned), warned
