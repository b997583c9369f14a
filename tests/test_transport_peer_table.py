"""The IPv8 peer table's policy (issue 12 items 6 and 8), as bookkeeping without sockets: names are keys' (an id
another key holds gives an alias), and only trusted peers (vouched for, or that delivered a model) are kept in a
full table, offered to freely, and counted by `--min-peers`."""

from __future__ import annotations

from pathlib import Path

from quinkgl_cli import validation
from quinkgl_cli.transport.base import TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.outbox import Outbox
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable, alias
from quinkgl_cli.transport.ipv8.settings import Limits, StrangerLimits, TransportSettings

HOLD = 120.0


def _rec(name: str, key: bytes, first_seen: float = 0.0, **kw) -> PeerRecord:
    return PeerRecord(name, key, b"m" * 20, ("127.0.0.1", 7000), 7000, first_seen, 1, first_seen=first_seen, **kw)


def test_an_id_names_its_holder_and_gives_any_other_key_an_alias():
    table = PeerTable(8)
    assert table.name_for("peer-2", b"owner", 0.0, HOLD) == "peer-2"
    table.add(_rec("peer-2", b"owner"))
    assert table.name_for("peer-2", b"owner", 1.0, HOLD) == "peer-2"
    name = table.name_for("peer-2", b"squatter", 1.0, HOLD)
    assert name == alias("peer-2", b"squatter") == "peer-2~" + b"squatter".hex()[-16:]
    assert not validation.is_node_id(name)  # no key can claim an alias as its id
    # Lost: the id stays its key's for the hold, then anyone's.
    table.remove("peer-2", released_at=10.0)
    assert table.name_for("peer-2", b"owner", 11.0, HOLD) == "peer-2"
    assert table.name_for("peer-2", b"squatter", 11.0, HOLD) == name
    assert table.name_for("peer-2", b"squatter", 10.0 + HOLD, HOLD) == "peer-2"


def test_trust_is_a_vouch_or_a_delivered_model_never_a_fetch():
    rec = _rec("p", b"k")
    assert not rec.trusted and not rec.info().trusted
    rec.fetched = 5  # anyone can download our models
    assert not rec.trusted
    rec.delivered = 1
    assert rec.trusted and rec.info().trusted
    assert _rec("s", b"s", vouched=True).info().trusted
    assert _rec("x", b"x", claimed="peer-2").claimed == "peer-2" and _rec("y", b"y").claimed == "y"


def test_a_full_table_evicts_the_newest_untrusted_peer_past_its_grace_and_any_for_a_vouched_newcomer():
    table = PeerTable(4)
    table.add(_rec("seed", b"a", first_seen=0.0, vouched=True))
    table.add(_rec("useful", b"b", first_seen=1.0, delivered=1))
    table.add(_rec("old", b"c", first_seen=2.0))
    table.add(_rec("new", b"d", first_seen=50.0))
    assert table.full() and table.untrusted() == 2
    assert table.eviction_candidate(now=40.0, grace=30.0).node_id == "old"  # "new" is still within its grace
    assert table.eviction_candidate(now=90.0, grace=30.0).node_id == "new"  # the newest past it: long-lived stay
    assert table.eviction_candidate(now=40.0, grace=30.0, vouched=True).node_id == "new"  # no grace against a seed
    table.remove("old")
    table.remove("new")
    assert table.eviction_candidate(now=1e6, grace=0.0, vouched=True) is None  # trusted peers are never evicted


def _outbox(table: PeerTable, limits: Limits) -> Outbox:
    settings = TransportSettings(node_id="me", swarm_id="s", arch_hash="a", state_dir=Path("/nonexistent"),
                                 limits=limits)
    return Outbox(settings, table, courier=None, drops=DropLog(TransportStats(), "me"), tcp_port=1)  # type: ignore[arg-type]


def test_untrusted_peers_share_an_offer_budget_and_trusted_ones_are_never_held_back():
    limits = Limits(strangers=StrangerLimits(free=2, offer_rate=2.0, probation_offers=3))
    table = PeerTable(16)
    crowd = [_rec(f"u{i}", bytes([i]) * 8) for i in range(6)]
    for rec in crowd:
        table.add(rec)
    friend = _rec("friend", b"f" * 8, vouched=True)
    table.add(friend)
    out = _outbox(table, limits)
    # 6 untrusted, 2 of them free: each may have one offer every (6 - 2) / 2 = 2 seconds.
    assert out.refusal(crowd[0], now=10.0) is None
    crowd[0].last_offer = 10.0
    assert out.refusal(crowd[0], now=11.0) == "untrusted_budget"
    assert out.refusal(crowd[1], now=11.0) is None  # the others' turns are their own
    assert out.refusal(crowd[0], now=12.0) is None
    friend.last_offer = 12.0
    assert out.refusal(friend, now=12.0) is None
    crowd[2].unanswered = 3
    assert out.refusal(crowd[2], now=100.0) == "unproven"
    crowd[2].delivered = 1  # it proved itself since: its unfetched offers are forgiven
    assert out.refusal(crowd[2], now=100.0) is None


def test_a_small_swarm_of_newcomers_is_not_held_back():
    limits = Limits()
    table = PeerTable(256)
    peers = [_rec(f"p{i}", bytes([i]) * 8) for i in range(limits.strangers.free)]
    for rec in peers:
        table.add(rec)
        rec.last_offer = 5.0
    out = _outbox(table, limits)
    assert all(out.refusal(rec, now=5.0) is None for rec in peers)  # several gossip steps in one round



def test_min_peers_waits_for_trusted_peers_once_enough_were_named():
    from types import SimpleNamespace

    from quinkgl_cli.node.runloop import RoundLoop
    from quinkgl_cli.transport.base import PeerInfo

    peers = [PeerInfo("seed", "aa", None, 0.0, trusted=True)] + [
        PeerInfo(f"sybil-{i}", f"{i:02x}", None, 0.0, trusted=False) for i in range(50)]

    def ready(named: int, want: int) -> int:
        transport = SimpleNamespace(peers=lambda: peers, named_peers=lambda: named)
        loop = RoundLoop.__new__(RoundLoop)  # only its node is asked
        loop.node = SimpleNamespace(transport=transport)  # type: ignore[assignment]
        return loop.ready_peers(want)

    assert ready(named=2, want=2) == 1  # two seeds named: fifty strangers do not start our rounds
    assert ready(named=1, want=2) == 51  # peers meet through introductions: any peer counts, as before


def test_the_packet_gate_sheds_strangers_while_we_fall_behind_never_trusted_peers_or_seeds():
    from quinkgl_cli.transport.ipv8.gate import PacketGate

    table = PeerTable(8)
    table.add(_rec("friend", b"f" * 8, delivered=1))
    table.add(_rec("newbie", b"n" * 8))
    queue = [0.0]
    gate = PacketGate(Limits(strangers=StrangerLimits(packets=1000.0)), table, DropLog(TransportStats(), "me"),
                      named=frozenset({("127.0.0.1", 7001)}), backlog=lambda: queue[0])
    seed, other = ("127.0.0.1", 7001), ("127.0.0.1", 7002)
    assert gate.admits(other, b"stranger") and gate.admits(other, b"n" * 8)
    queue[0] = 0.9  # we read slower than datagrams come: a flood is queueing up
    gate._behind = (float("-inf"), False)  # the next packet reads the queue again
    assert not gate.admits(other, b"stranger") and not gate.admits(other, b"n" * 8)
    assert gate.admits(other, b"f" * 8) and gate.admits(seed, b"stranger")  # a seed's first hello too


def test_a_real_endpoint_reports_its_receive_backlog(tmp_path):
    import asyncio
    import socket

    from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard, GuardedUDPEndpoint
    from quinkgl_cli.transport.ipv8.seal import DatagramSeal

    async def main() -> float:
        endpoint = GuardedUDPEndpoint("127.0.0.1", 0, DestinationGuard("127.0.0.1"), DatagramSeal(bytes(32)))
        await endpoint.open()
        try:
            assert endpoint.backlog() == 0.0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(200):
                    s.sendto(b"x" * 1000, endpoint.get_address())
            return endpoint.backlog()  # nothing read yet: the loop has not run
        finally:
            endpoint.close()

    assert asyncio.run(main()) > 0.05
