"""Behaviour specific to the in-memory transport: lockstep delivery without a loop, determinism, fault injection.

What both transports share is tested in test_transport_contract.py.
"""

import asyncio
import hashlib
import logging

import pytest

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.base import OutgoingUpdate
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport


class Recorder:
    def __init__(self) -> None:
        self.discovered: list[str] = []
        self.lost: list[str] = []
        self.models = []
        self.messages = []

    def on_peer_discovered(self, peer):
        self.discovered.append(peer.node_id)

    def on_peer_lost(self, peer):
        self.lost.append(peer.node_id)

    def on_model(self, update):
        self.models.append(update)

    def on_message(self, sender, kind, body):
        self.messages.append((sender, kind, body))


def _swarm(n, **kw):
    clock = {"t": 0.0}
    net = MemoryNetwork(clock=lambda: clock["t"], **kw)
    nodes = {}
    for i in range(n):
        t = MemoryTransport(net, f"p{i}", swarm_id="s", arch_hash="a")
        rec = Recorder()
        t.start_sync(rec)
        nodes[t.node_id] = (t, rec)
    return net, nodes, clock


def _upd(round_=1, payload=b"x" * 100, **kw):
    return OutgoingUpdate(round=round_, payload=payload, sample_count=10, **kw)


def test_lockstep_without_event_loop():
    net, nodes, clock = _swarm(4)
    assert all(not t.peers() for t, _ in nodes.values())  # nothing happens until the simulator delivers
    net.deliver_all()
    for name, (t, rec) in nodes.items():
        assert sorted(p.node_id for p in t.peers()) == sorted(n for n in nodes if n != name)
        assert sorted(rec.discovered) == sorted(n for n in nodes if n != name)
    clock["t"] = 5.0
    nodes["p0"][0].send_model("p1", _upd())
    assert nodes["p1"][1].models == []
    assert net.pending == 1
    net.deliver_all()
    (got,) = nodes["p1"][1].models
    assert got.sender == "p0" and got.received_at == 5.0 and got.payload == b"x" * 100
    assert {p.node_id: p.last_seen for p in nodes["p1"][0].peers()}["p0"] == 5.0


def test_deliver_pending_moves_one_hop_only():
    net, nodes, _ = _swarm(2)
    net.deliver_all()

    class Echo(Recorder):
        def on_message(self, sender, kind, body):
            super().on_message(sender, kind, body)
            nodes["p1"][0].send_message(sender, "echo", body)

    echo = Echo()
    nodes["p1"][0]._events = echo
    nodes["p0"][0].send_message("p1", "ping", {"n": 1})
    assert net.deliver_pending() == 1
    assert echo.messages == [("p0", "ping", {"n": 1})]
    assert nodes["p0"][1].messages == []
    net.deliver_pending()
    assert nodes["p0"][1].messages == [("p1", "echo", {"n": 1})]


def test_runs_are_deterministic_under_loss():
    def run():
        net, nodes, _ = _swarm(5, loss=0.3, seed=7)
        net.deliver_all()
        for r in range(5):
            for t, _ in nodes.values():
                for p in t.peers():
                    t.send_model(p.node_id, _upd(r, bytes([r]) * 10))
            net.deliver_all()
        return {n: [(m.sender, m.round) for m in rec.models] for n, (_, rec) in nodes.items()}

    first = run()
    assert first == run()
    total = sum(len(v) for v in first.values())
    assert 0 < total < 5 * 20  # loss dropped some, not all


def test_partition_reports_peers_lost_and_heal_rediscovers():
    net, nodes, _ = _swarm(4)
    net.deliver_all()
    net.partition(["p0", "p1"], ["p2", "p3"])
    net.deliver_all()
    assert sorted(p.node_id for p in nodes["p0"][0].peers()) == ["p1"]
    assert sorted(nodes["p0"][1].lost) == ["p2", "p3"]
    nodes["p0"][0].send_model("p2", _upd())
    net.deliver_all()
    assert nodes["p2"][1].models == []
    net.heal()
    net.deliver_all()
    assert sorted(p.node_id for p in nodes["p0"][0].peers()) == ["p1", "p2", "p3"]
    nodes["p0"][0].send_model("p2", _upd())
    net.deliver_all()
    assert len(nodes["p2"][1].models) == 1


def test_block_is_one_way():
    net, nodes, _ = _swarm(2)
    net.deliver_all()
    net.block("p0", "p1")
    nodes["p0"][0].send_message("p1", "k", {})
    nodes["p1"][0].send_message("p0", "k", {})
    net.deliver_all()
    assert nodes["p1"][1].messages == []
    assert nodes["p0"][1].messages == [("p1", "k", {})]
    net.unblock("p0", "p1")
    nodes["p0"][0].send_message("p1", "k", {})
    net.deliver_all()
    assert nodes["p1"][1].messages == [("p0", "k", {})]


def test_corruption_is_caught_by_digest_and_logged_once(caplog):
    net, nodes, _ = _swarm(2)
    net.deliver_all()
    net.corrupt("p0", "p1", count=3)
    with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
        for r in range(4):
            nodes["p0"][0].send_model("p1", _upd(r))
        net.deliver_all()
    assert [m.round for m in nodes["p1"][1].models] == [3]
    assert nodes["p1"][0].stats.dropped == 3
    lines = [r.getMessage() for r in caplog.records if "digest_mismatch" in r.getMessage()]
    assert len(lines) == 1 and "peer=p0" in lines[0]


def test_a_delivered_update_carries_the_digest_its_bytes_were_checked_against():
    # The receiver's copy guard takes the digest from here instead of hashing the payload again.
    net, nodes, _ = _swarm(3)
    net.deliver_all()
    update = _upd(2)
    for peer in ("p1", "p2"):
        nodes["p0"][0].send_model(peer, update)
    net.deliver_all()
    for peer in ("p1", "p2"):
        (got,) = nodes[peer][1].models
        assert got.digest == hashlib.sha256(got.payload).digest()


def test_kill_mid_transfer_reports_vanished_sender_and_loss(caplog):
    net, nodes, _ = _swarm(3)
    net.deliver_all()
    nodes["p0"][0].send_model("p1", _upd())
    net.kill("p0")
    with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
        net.deliver_all()
    assert nodes["p1"][1].models == []
    assert "sender_vanished" in caplog.text
    assert nodes["p1"][1].lost == ["p0"] and nodes["p2"][1].lost == ["p0"]
    assert [p.node_id for p in nodes["p1"][0].peers()] == ["p2"]


def test_restarted_peer_is_rediscovered_and_starts_afresh():
    net, nodes, _ = _swarm(2)
    net.deliver_all()
    nodes["p0"][0].send_model("p1", _upd(round_=9))
    net.deliver_all()
    nodes["p0"][0].stop_sync()
    net.deliver_all()
    again = MemoryTransport(net, "p0", swarm_id="s", arch_hash="a")
    again.start_sync(Recorder())
    net.deliver_all()
    again.send_model("p1", _upd(round_=4))  # a restart from an older checkpoint is not 'out of date'
    net.deliver_all()
    assert [m.round for m in nodes["p1"][1].models] == [9, 4]
    assert nodes["p1"][1].discovered == ["p0", "p0"]


def test_same_node_id_twice_is_refused():
    net, nodes, _ = _swarm(1)
    with pytest.raises(NetworkError, match="already running"):
        MemoryTransport(net, "p0").start_sync(Recorder())


def test_auto_delivery_inside_event_loop():
    async def main():
        net = MemoryNetwork()
        a, b = MemoryTransport(net, "a"), MemoryTransport(net, "b")
        ra, rb = Recorder(), Recorder()
        await a.start(ra)
        await b.start(rb)
        await asyncio.sleep(0)
        assert rb.discovered == ["a"]
        a.send_model("b", _upd())
        assert rb.models == []
        await asyncio.sleep(0)
        assert len(rb.models) == 1
        await a.stop()
        await asyncio.sleep(0)
        assert rb.lost == ["a"]

    asyncio.run(main())


def test_auto_delivery_can_be_turned_off_inside_a_loop():
    async def main():
        net = MemoryNetwork(auto_deliver=False)
        a, b = MemoryTransport(net, "a"), MemoryTransport(net, "b")
        rb = Recorder()
        await a.start(Recorder())
        await b.start(rb)
        await asyncio.sleep(0.01)
        assert rb.discovered == []
        net.deliver_all()
        assert rb.discovered == ["a"]

    asyncio.run(main())


def test_event_names_use_hyphens(caplog):
    """Log lines are a public interface: every event the memory transport logs is hyphenated, like IPv8's."""
    net, nodes, _ = _swarm(3)
    odd = MemoryTransport(net, "odd", swarm_id="s", arch_hash="other")
    with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
        odd.start_sync(Recorder())
        net.deliver_all()
        a, b = nodes["p0"][0], nodes["p1"][0]
        a.send_model("nobody", _upd())
        a.send_message("nobody", "k", {})
        b.max_model_bytes = 10
        a.send_model("p1", _upd())
        net.deliver_all()
        b.max_model_bytes = 1 << 20
        a.send_model("p1", _upd(round_=3))
        a.send_model("p1", _upd(round_=2))
        net.corrupt("p0", "p1")
        a.send_model("p1", _upd(round_=5))
        net.deliver_all()
        a.send_model("p1", _upd(round_=6))
        a.stop_sync()
        net.deliver_all()
    events = {r.getMessage().split()[0] for r in caplog.records if r.name == "quinkgl.transport"}
    expected = {"transport-started", "peer-discovered", "peer-refused", "send-failed", "message-failed", "offer-refused",
                "offer-ignored", "fetch-failed", "peer-lost", "transport-stopped"}
    assert expected <= events, expected - events
    assert not [e for e in events if "_" in e], events


def test_default_peer_bound_is_the_ipv8_transports():
    import inspect

    from quinkgl_cli.transport.ipv8.transport import IPv8Transport
    from quinkgl_cli.transport.memory import DEFAULT_MAX_PEERS

    assert inspect.signature(IPv8Transport.__init__).parameters["max_peers"].default == DEFAULT_MAX_PEERS


def _connected(nodes, alive):
    start = next(iter(alive))
    seen, todo = {start}, [start]
    while todo:
        for p in nodes[todo.pop()][0].peers():
            if p.node_id not in seen:
                seen.add(p.node_id)
                todo.append(p.node_id)
    return seen == set(alive)


def test_views_are_bounded_connected_and_refilled_after_losses():
    net = MemoryNetwork(auto_deliver=False, seed=3)
    nodes = {}
    for i in range(60):
        t = MemoryTransport(net, f"p{i:02d}", swarm_id="s", arch_hash="a", max_peers=6)
        rec = Recorder()
        t.start_sync(rec)
        nodes[t.node_id] = (t, rec)
    assert net.pending <= 2 * 60 * 3  # introductions grow with peers * seek, not peers ** 2
    net.deliver_all()
    views = {n: {p.node_id for p in t.peers()} for n, (t, _) in nodes.items()}
    assert all(3 <= len(v) <= 6 for v in views.values()), sorted(len(v) for v in views.values())
    assert all(n in views[p] for n, v in views.items() for p in v)  # both ends know each other
    assert sum(len(rec.discovered) for _, rec in nodes.values()) == sum(len(v) for v in views.values())
    assert _connected(nodes, nodes)
    for i in range(0, 60, 6):  # a tenth of the swarm dies; the walk refills the survivors' views
        net.kill(f"p{i:02d}")
    net.deliver_all()
    alive = {n for n in nodes if int(n[1:]) % 6}
    for n in alive:
        known = {p.node_id for p in nodes[n][0].peers()}
        assert known <= alive and 3 <= len(known) <= 6, (n, known)
    assert _connected(nodes, alive)


def test_small_swarm_is_fully_known_under_a_bound():
    net = MemoryNetwork(auto_deliver=False)
    swarm = [MemoryTransport(net, f"q{i}", swarm_id="s", arch_hash="a", max_peers=6) for i in range(4)]
    for t in swarm:
        t.start_sync(Recorder())
    net.deliver_all()
    assert [len(t.peers()) for t in swarm] == [3] * 4  # seek 6 // 2 = 3: a swarm of 4 is complete



def test_bad_bounds_are_refused():
    net = MemoryNetwork()
    with pytest.raises(NetworkError, match="max peers"):
        MemoryTransport(net, "a", max_peers=0)
    with pytest.raises(NetworkError, match="seek"):
        MemoryTransport(net, "a", max_peers=4, seek=5)


def test_stop_all_stops_everyone_at_once_without_queuing_losses():
    net, nodes, _ = _swarm(4)
    net.deliver_all()
    nodes["p0"][0].send_model("p1", _upd())  # still queued: dropped with the network
    net.stop_all()
    assert net.pending == 0
    assert all(not t.running and t.peers() == [] for t, _ in nodes.values())
    net.deliver_all()
    assert all(r.lost == [] for _, r in nodes.values()) and nodes["p1"][1].models == []
    again = MemoryTransport(net, "p0", swarm_id="s", arch_hash="a")  # the id is free again
    again.start_sync(Recorder())
    assert again.running


def _graph_with_churn(scan: bool, n: int, max_peers: int, seed: int) -> list[tuple[str, list[str]]]:
    net = MemoryNetwork(auto_deliver=False, seed=seed)
    if scan:
        net.block("nobody", "none")  # any fault takes the scanning path; this one touches no transport
    nodes = {}
    for i in range(n):
        t = MemoryTransport(net, f"p{i:03d}", swarm_id="s" if i % 7 else "other", arch_hash="a", max_peers=max_peers)
        rec = Recorder()
        t.start_sync(rec)
        nodes[t.node_id] = (t, rec)
        net.deliver_all()
        if i % 11 == 10:  # losses and a rejoin refill views: the index must follow links as they go
            net.kill(f"p{i - 5:03d}")
            net.deliver_all()
            again = MemoryTransport(net, f"p{i - 5:03d}", swarm_id="s", arch_hash="a", max_peers=max_peers)
            again.start_sync(Recorder())
            net.deliver_all()
    return [(name, [p.node_id for p in t.peers()]) for name, (t, _) in nodes.items()] + sorted(
        (k, sorted(v)) for k, v in net._links.items())


@pytest.mark.parametrize(("n", "max_peers", "seed"), [(40, 6, 1), (150, 8, 2), (90, 64, 3), (30, 256, 4)])
def test_introductions_from_the_room_index_are_the_scans(n, max_peers, seed):
    assert _graph_with_churn(False, n, max_peers, seed) == _graph_with_churn(True, n, max_peers, seed)


def test_a_stop_reaches_every_peer_that_knows_the_stopped_one_even_without_a_link():
    net, nodes, _ = _swarm(3, auto_deliver=False)
    net.deliver_all()
    net.block("p1", "p0")  # p1's walk cannot take p0 back
    nodes["p1"][0]._lose("p0")  # p1 drops p0 (as after a silence): the link is gone, p0 still knows p1
    net.deliver_all()
    assert [p.node_id for p in nodes["p0"][0].peers()] == ["p1", "p2"] and "p0" not in net._links["p1"]
    nodes["p1"][0].stop_sync()
    net.deliver_all()
    assert nodes["p0"][1].lost == ["p1"] and nodes["p2"][1].lost == ["p1"]
    assert [p.node_id for p in nodes["p0"][0].peers()] == ["p2"]
