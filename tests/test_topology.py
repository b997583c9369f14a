"""Topologies: determinism, Cyclon's view and shuffle invariants, Affinity's preference after cold start."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch

from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate, Topology
from quinkgl_cli.strategies.fingerprint import Fingerprint
from quinkgl_cli.strategies.spectral import analyze_adjacency, analyze_edges, ring_adjacency
from quinkgl_cli.strategies.topology import AffinityTopology, CyclonTopology, contribution_qualities

PEERS = [f"n{i:02d}" for i in range(12)]


def make(name: str, self_id: str = "n00", seed: int = 0, **params: object) -> Topology:
    entry = registry.resolve("topology", name)
    return registry.load(entry)(registry.build_params(entry, dict(params)), self_id, random.Random(seed))


@pytest.mark.parametrize("name", ["RandomTopology", "CyclonTopology", "AffinityTopology", "RingTopology",
                                  "RotationTopology"])
def test_selection_is_deterministic_bounded_and_excludes_self(name: str) -> None:
    a = make(name, fanout=3, seed=7)
    b = make(name, fanout=3, seed=7)
    shuffled = list(reversed(PEERS))
    for r in range(10):
        sa, sb = a.select(PEERS, r), b.select(shuffled, r)
        assert sa == sb
        assert len(sa) == 3 and len(set(sa)) == 3 and "n00" not in sa and set(sa) <= set(PEERS)
    assert make(name, fanout=5).select(["n00", "n01", "n02"], 0) in (["n01", "n02"], ["n02", "n01"])
    assert make(name).select([], 0) == []


def test_random_topology_is_uniform() -> None:
    topo = make("RandomTopology", fanout=2)
    counts = Counter(p for r in range(1100) for p in topo.select(PEERS, r))
    assert set(counts) == set(PEERS) - {"n00"}
    assert max(counts.values()) < 1.3 * min(counts.values())


@pytest.mark.parametrize(("n", "fanout"), [(20, 3), (12, 5), (7, 6), (5, 1)])
def test_rotation_topology_balances_receivers_and_covers_every_peer(n: int, fanout: int) -> None:
    ids = [f"peer-{i:03d}" for i in range(n)]
    topos = {me: make("RotationTopology", self_id=me, fanout=fanout) for me in ids}
    cycle = -(-(n - 1) // fanout)  # ceil((n - 1) / fanout)
    for start in (1, 4):
        heard: dict[str, set[str]] = {me: set() for me in ids}
        for r in range(start, start + cycle):
            received = Counter()
            for me in ids:
                chosen = topos[me].select([p for p in reversed(ids) if p != me], r)
                assert len(chosen) == fanout and len(set(chosen)) == fanout and me not in chosen
                received.update(chosen)
                for peer in chosen:
                    heard[peer].add(me)
            assert set(received.values()) == {fanout}  # every peer receives exactly fanout models a round
        assert all(heard[me] == set(ids) - {me} for me in ids)  # ... and hears from every peer within a cycle
    assert make("RotationTopology", self_id="a").select(["b"], 0) == ["b"]


def test_full_topology_selects_everyone() -> None:
    assert make("FullTopology", fanout=1).select(PEERS, 0) == PEERS[1:]


def test_ring_topology_builds_a_ring() -> None:
    edges = [(me, peer) for me in PEERS for peer in make("RingTopology", self_id=me, fanout=2).select(PEERS, 0)]
    report = analyze_edges(edges)
    expected = analyze_adjacency(ring_adjacency(len(PEERS)))
    assert report.edges == len(PEERS)
    assert report.algebraic_connectivity == pytest.approx(expected.algebraic_connectivity)


# ------------------------------------------------------------------ Cyclon
def _cyclon_swarm(n: int, rounds: int, view_size: int, shuffle_length: int) -> tuple[dict[str, CyclonTopology], list[dict[str, int]]]:
    ids = [f"p{i:02d}" for i in range(n)]
    nodes: dict[str, CyclonTopology] = {
        pid: make("CyclonTopology", self_id=pid, seed=i, fanout=2, view_size=view_size, shuffle_length=shuffle_length)  # type: ignore[misc]
        for i, pid in enumerate(ids)
    }
    snapshots = []
    for r in range(rounds):
        queue: list[tuple[str, str, str, dict[str, Any]]] = []
        for pid, node in nodes.items():
            node.select(ids, r)
            for target, kind, body in node.control_messages(r):
                assert kind == CyclonTopology.SHUFFLE
                entries = body["entries"].split(",")
                assert len(entries) <= shuffle_length and f"{pid}|0" in entries
                assert target not in node.view  # the shuffle partner leaves the initiator's view
                queue.append((pid, target, kind, body))
        while queue:
            sender, target, kind, body = queue.pop(0)
            for back, reply_kind, reply in nodes[target].on_control(sender, kind, body):
                queue.append((target, back, reply_kind, reply))
        for pid, node in nodes.items():
            assert len(node.view) <= view_size and pid not in node.view and set(node.view) <= set(ids)
        snapshots.append({pid: len(node.view) for pid, node in nodes.items()})
    return nodes, snapshots


def test_cyclon_views_stay_bounded_and_keep_changing() -> None:
    nodes, _ = _cyclon_swarm(n=16, rounds=12, view_size=4, shuffle_length=3)
    before = {pid: set(node.view) for pid, node in nodes.items()}
    nodes2, _ = _cyclon_swarm(n=16, rounds=13, view_size=4, shuffle_length=3)
    after = {pid: set(node.view) for pid, node in nodes2.items()}
    assert sum(before[p] != after[p] for p in before) >= 8  # shuffles keep refreshing views
    indegree = Counter(p for node in nodes.values() for p in node.view)
    assert len(indegree) >= 12  # membership spreads: most nodes sit in someone's view


def test_cyclon_shuffle_exchanges_entries() -> None:
    a = make("CyclonTopology", self_id="a", view_size=3, shuffle_length=2)
    b = make("CyclonTopology", self_id="b", view_size=3, shuffle_length=2)
    assert isinstance(a, CyclonTopology) and isinstance(b, CyclonTopology)
    a.select(["b", "c", "d"], 0)
    b.select(["a", "e", "f"], 0)
    a.view["b"] = 5  # the oldest: a shuffles with b
    [(target, kind, body)] = a.control_messages(1)
    assert target == "b" and "b" not in a.view
    sent = [e.split("|")[0] for e in body["entries"].split(",")]
    assert len(sent) == 2 and "a" in sent
    [(back, reply_kind, reply)] = b.on_control("a", kind, body)
    assert back == "a" and reply_kind == CyclonTopology.REPLY
    got = [e.split("|")[0] for e in reply["entries"].split(",")]
    assert "a" not in got and len(got) == 2
    assert "a" in b.view  # b learned the initiator
    assert a.on_control("b", reply_kind, reply) == []
    assert set(got) <= set(a.view) and len(a.view) == 3
    # An unsolicited reply changes nothing; malformed entries are refused.
    view = dict(a.view)
    a.on_control("zz", CyclonTopology.REPLY, {"entries": "q|1"})
    assert a.view == view
    for bad in ("x", "x|-1", "a b|1", ",".join(f"p{i}|1" for i in range(10))):
        with pytest.raises(ValueError):
            b.on_control("a", CyclonTopology.SHUFFLE, {"entries": bad})


def test_cyclon_learns_ids_beyond_partial_transport_knowledge() -> None:
    # 16 nodes on a ring; each transport knows only its 4 nearest ring neighbours. Shuffles spread other ids into
    # the views, while recipients and shuffle partners stay among the peers the transport can reach.
    n, view_size = 16, 6
    ids = [f"p{i:02d}" for i in range(n)]
    known = {ids[i]: [ids[(i + d) % n] for d in (-2, -1, 1, 2)] for i in range(n)}
    nodes: dict[str, CyclonTopology] = {
        pid: make("CyclonTopology", self_id=pid, seed=i, fanout=2, view_size=view_size, shuffle_length=3)  # type: ignore[misc]
        for i, pid in enumerate(ids)
    }
    seen: dict[str, set[str]] = {pid: set() for pid in ids}
    for r in range(30):
        queue: list[tuple[str, str, str, dict[str, Any]]] = []
        for pid, node in nodes.items():
            recipients = node.select(known[pid], r)
            assert len(recipients) == 2 and set(recipients) <= set(known[pid])
            seen[pid] |= set(node.view)  # after select: learned entries survive the transport's view of peers
            for target, kind, body in node.control_messages(r):
                assert target in known[pid]  # a transport can only address peers it knows
                queue.append((pid, target, kind, body))
        while queue:
            sender, target, kind, body = queue.pop(0)
            for back, reply_kind, reply in nodes[target].on_control(sender, kind, body):
                assert back in known[target]
                queue.append((target, back, reply_kind, reply))
        for pid, node in nodes.items():
            assert len(node.view) <= view_size and pid not in node.view and set(node.view) <= set(ids)
    learned = {pid: seen[pid] - set(known[pid]) for pid in ids}
    assert all(len(learned[pid]) >= 3 for pid in ids), learned  # every node heard of peers beyond its neighbours
    for pid, node in nodes.items():
        node.select(known[pid], 30)
    assert sum(len(set(node.view) - set(known[pid])) for pid, node in nodes.items()) >= n  # and keeps some now
    # A learned id becomes a recipient as soon as the transport discovers it.
    me = nodes["p00"]
    stranger = sorted(set(me.view) - set(known["p00"]))[0]
    me.select([*known["p00"], stranger], 31)
    assert stranger in me.reachable()


def test_cyclon_keeps_unreachable_entries_but_never_contacts_them() -> None:
    a = make("CyclonTopology", self_id="a", fanout=2, view_size=3, shuffle_length=3)
    assert isinstance(a, CyclonTopology)
    a.on_control("b", CyclonTopology.SHUFFLE, {"entries": "x|1,y|1,b|0"})
    assert a.view == {"x": 1, "y": 1, "b": 0}
    # The transport knows b and c: the oldest unreachable entry (x) makes room for c so that fanout 2 is reachable;
    # y, learned from b's shuffle, stays.
    assert sorted(a.select(["b", "c"], 1)) == ["b", "c"]
    assert a.view == {"y": 1, "b": 0, "c": 0}
    # The oldest entry y is unreachable: it leaves like a failed contact, the shuffle goes to the oldest reachable.
    [(target, kind, body)] = a.control_messages(1)
    assert target == "b" and kind == CyclonTopology.SHUFFLE and a.view == {"c": 1}
    assert body["entries"] == "c|1,a|0"
    # Nothing reachable in the view and nothing known: no shuffle, no recipients.
    z = make("CyclonTopology", self_id="z")
    assert isinstance(z, CyclonTopology)
    z.on_control("q", CyclonTopology.SHUFFLE, {"entries": "q|0"})
    assert z.select([], 1) == [] and z.control_messages(1) == [] and z.view == {}


def test_cyclon_state_round_trips() -> None:
    a = make("CyclonTopology", self_id="a")
    a.select(PEERS, 0)
    a.control_messages(0)
    b = make("CyclonTopology", self_id="a")
    b.load_state_dict(a.state_dict())
    assert isinstance(a, CyclonTopology) and isinstance(b, CyclonTopology) and b.view == a.view


# ------------------------------------------------------------------ Affinity
def _fp(labels: str) -> dict[str, Any]:
    return Fingerprint(tuple(int(c) for c in labels), 1.0, "100-1k", ((0.5, 1.0),) * 4).to_body()


def _affinity(**params: object) -> AffinityTopology:
    topo = make("AffinityTopology", fanout=2, **params)
    assert isinstance(topo, AffinityTopology)
    topo.observe_fingerprint("n00", _fp("3300000000"))
    for i, pid in enumerate(PEERS[1:], start=1):
        topo.observe_fingerprint(pid, _fp("3300000000" if i <= 2 else "0000003300"))
    return topo


def test_affinity_prefers_similar_fingerprints_after_cold_start() -> None:
    topo = _affinity(blind_rounds=3, learning_rounds=3)
    blind = Counter(p for r in range(1, 4) for p in topo.select(PEERS, r))
    later = Counter(p for r in range(10, 60) for p in topo.select(PEERS, r))
    similar = later["n01"] + later["n02"]
    assert similar >= 0.85 * 100  # 2 slots x 50 rounds, exploration decays to 5 %
    assert [topo.phase(r)[0] for r in (1, 3, 4, 6, 7)] == ["blind", "blind", "learning", "learning", "exploiting"]
    assert topo.phase(7)[1] == pytest.approx(0.3) and topo.phase(8)[1] == pytest.approx(0.27)
    assert topo.phase(50)[1] == pytest.approx(0.05)
    assert sum(blind.values()) == 6
    assert topo.affinity("n01") > topo.affinity("n05")


def test_affinity_blind_phase_is_random() -> None:
    topo = _affinity(blind_rounds=400)
    counts = Counter(p for r in range(400) for p in topo.select(PEERS, r))
    assert counts["n01"] + counts["n02"] < 0.4 * 800


def test_affinity_prefer_dissimilar() -> None:
    topo = _affinity(blind_rounds=0, learning_rounds=0, exploration=0.0, min_exploration=0.0, prefer_similar=False)
    assert not {"n01", "n02"} & set(topo.select(PEERS, 5))


def test_affinity_history_ema_decay_and_eviction() -> None:
    topo = make("AffinityTopology", fanout=1, blind_rounds=0, learning_rounds=0, exploration=0.0, min_exploration=0.0,
                ema=0.5, edge_decay=0.5, edge_ttl=3)
    assert isinstance(topo, AffinityTopology)
    topo.select(PEERS, 1)
    topo.record_outcome("n05", 1.0)
    topo.record_outcome("n07", 0.0)
    assert topo.select(PEERS, 1) == ["n05"]  # only history: the helpful peer wins
    topo.record_outcome("n07", 1.0)  # EMA: 0.5 * 0 + 0.5 * 1
    assert topo.edges["n07"].weight == pytest.approx(0.5)
    topo.select(PEERS, 3)  # two rounds without news: weight decays by 0.5^2
    assert topo.affinity("n05") == pytest.approx(0.25)
    topo.select(PEERS, 4)  # edge_ttl = 3 rounds without news: kept
    assert "n05" in topo.edges
    topo.select(PEERS, 5)  # more than edge_ttl rounds without news: evicted
    assert topo.edges == {}
    assert topo.affinity("n05") == 0.5


def test_affinity_rejects_bad_fingerprints_and_round_trips() -> None:
    topo = _affinity()
    with pytest.raises(ValueError):  # the exchange reports it (once per peer)
        topo.observe_fingerprint("n03", {"fp": 1, "labels": "9x", "samples": "?", "entropy": 1.0})
    assert topo.fingerprints["n03"].labels[0] == 0  # the earlier valid one stays
    topo.select(PEERS, 1)
    topo.record_outcome("n04", 0.8)
    other = make("AffinityTopology")
    other.load_state_dict(topo.state_dict())
    assert isinstance(other, AffinityTopology) and other.edges["n04"].weight == pytest.approx(0.8)


def _updates() -> tuple[PeerUpdate, list[PeerUpdate]]:
    g = torch.Generator().manual_seed(5)
    centre = torch.linspace(-1, 1, 32)
    local = PeerUpdate("n00", 1, centre + 0.1 * torch.randn(32, generator=g), 100, is_local=True)
    near = [PeerUpdate(f"n0{i}", 1, centre + 0.1 * torch.randn(32, generator=g), 100) for i in (1, 2, 3)]
    closest = PeerUpdate("n04", 1, centre.clone(), 100)
    far = PeerUpdate("n05", 1, centre * 6.0, 100)  # far, but along the honest direction: used, not refused
    broken = PeerUpdate("n06", 1, torch.full((32,), float("nan")), 100)
    return local, [*near, closest, far, broken]


def _aggregator(name: str, f: int = 0) -> Aggregator:
    entry = registry.resolve("aggregation", name)
    return registry.load(entry)(registry.build_params(entry, {}), byzantine_f=f)


def test_contribution_qualities_are_graded_under_averaging() -> None:
    local, others = _updates()
    result = _aggregator("FedAvg").aggregate(local, others, 1)
    assert "n05" in result.used  # FedAvg uses the outlier: a used/unused bit would score it 1 like the rest
    q = contribution_qualities(local, others, result)
    assert set(q) == {"n01", "n02", "n03", "n04", "n05", "n06"}
    assert all(0.0 <= v <= 1.0 for v in q.values())
    assert q["n06"] == 0.0  # rejected (non-finite)
    assert q["n05"] < 0.05  # far from the aggregate
    assert min(q["n01"], q["n02"], q["n03"], q["n04"]) > 0.3  # the honest ones: near the neutral 0.5
    # Among honest updates only, the one nearest the consensus scores best.
    honest = others[:4]
    qh = contribution_qualities(local, honest, _aggregator("FedAvg").aggregate(local, honest, 1))
    assert qh["n04"] == max(qh.values()) and qh["n04"] > 0.7 and min(qh.values()) < 0.55
    # Krum adopts one update: that one scores exactly 1, an honest unchosen peer still scores well.
    krum = _aggregator("Krum", f=1).aggregate(local, others, 1)
    qk = contribution_qualities(local, others, krum)
    chosen = krum.used[0]
    assert chosen != "n05" and (chosen == "n00" or qk[chosen] == 1.0)
    assert qk["n05"] < 0.05 and sorted(qk.values())[-2] > 0.3
    # Identical models (converged swarm): everyone scores 1, nothing divides by zero.
    same = [PeerUpdate("n01", 1, local.flat.clone(), 10)]
    q_same = contribution_qualities(local, same, _aggregator("FedAvg").aggregate(local, same, 1))
    assert set(q_same) == {"n01"} and q_same["n01"] == pytest.approx(1.0, abs=0.01)  # float32 rounding only


def test_affinity_history_learns_from_graded_aggregations() -> None:
    topo = make("AffinityTopology", fanout=2, blind_rounds=0, learning_rounds=0, exploration=0.0, min_exploration=0.0)
    assert isinstance(topo, AffinityTopology)
    local, others = _updates()
    agg = _aggregator("FedAvg")
    for r in range(1, 6):
        topo.select(PEERS, r)
        topo.observe_aggregation(local, others, agg.aggregate(local, others, r))
    honest = ("n01", "n02", "n03", "n04")
    assert min(topo.affinity(p) for p in honest) > 0.4 > 0.05 > topo.affinity("n05")
    assert topo.affinity("n06") == 0.0
    # Peers it has not aggregated with yet keep the neutral 0.5; the outlier and the broken sender rank last.
    ranked = sorted(PEERS[1:], key=lambda p: -topo.affinity(p))
    assert ranked[-2:] == ["n05", "n06"]
    # Without a history weight the signal is not even computed.
    blind = make("AffinityTopology", history_weight=0.0)
    assert isinstance(blind, AffinityTopology)
    blind.observe_aggregation(local, others, agg.aggregate(local, others, 1))
    assert blind.edges == {}
    # The plain per-peer call keeps working.
    topo.record_outcome("n09", 1.0)
    assert topo.edges["n09"].weight == 1.0
    # Topologies without a history accept the call and ignore it.
    make("RandomTopology").observe_aggregation(local, others, agg.aggregate(local, others, 1))
