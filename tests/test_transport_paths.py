"""The way an offer's bytes take through NATs: the route chooser (`paths.PathBook`) and the relay's bounds
(`relay.Relay`), without a network (socket pairs stand for the connections). The NAT lab (`test_natlab_e2e.py`)
runs the same parts between real processes behind real NATs."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from quinkgl_cli.transport.base import TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.paths import DIRECT, RELAY, REVERSE, UDP, UDP_RETRY_AFTER, PathBook, Route
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.relay import Relay
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.settings import Limits, RelayLimits, TransportSettings


def test_routes_go_direct_then_reverse_then_at_most_two_relays() -> None:
    book = PathBook(retry_after=60)
    assert book.routes("s", 0.0, ["r1", "r2", "r3"], reverse=True) == [
        Route(DIRECT), Route(REVERSE), Route(RELAY, "r1"), Route(RELAY, "r2")]
    # Behind a NAT ourselves, a sender cannot connect to us: no reverse; the sender is never its own relay.
    assert book.routes("r1", 0.0, ["r1", "r2"], reverse=False) == [Route(DIRECT), Route(RELAY, "r2")]


def test_the_way_that_worked_goes_first_and_a_failed_one_waits_its_turn() -> None:
    book = PathBook(retry_after=60)
    assert book.succeeded("s", Route(RELAY, "r2")) is True
    assert book.succeeded("s", Route(RELAY, "r2")) is False  # the same way again: not news
    assert book.routes("s", 0.0, ["r1", "r2"], reverse=True)[0] == Route(RELAY, "r2")
    book.failed("s", Route(DIRECT), 10.0)
    book.failed("s", Route(RELAY, "r2"), 11.0)
    assert book.current("s") is None
    assert book.routes("s", 20.0, ["r1", "r2"], reverse=True) == [Route(REVERSE), Route(RELAY, "r1")]
    assert book.routes("s", 71.0, ["r1", "r2"], reverse=True)[0] == Route(DIRECT)  # its wait is over
    # Everything failed lately: still something to try, the longest-failed first (a NAT may have changed).
    book.failed("s", Route(REVERSE), 12.0)
    book.failed("s", Route(RELAY, "r1"), 13.0)
    assert book.routes("s", 20.0, ["r1", "r2"], reverse=True)[:2] == [Route(DIRECT), Route(RELAY, "r2")]


def test_a_failed_udp_way_waits_seconds_not_the_minutes_a_tcp_way_waits() -> None:
    book = PathBook(retry_after=300.0)
    book.succeeded("s", Route(UDP))
    book.failed("s", Route(UDP), 10.0)  # a busy sender ignored the request
    book.failed("s", Route(DIRECT), 10.0)
    assert book.routes("s", 11.0, [], reverse=True, udp=True) == [Route(REVERSE)]
    assert book.routes("s", 10.0 + UDP_RETRY_AFTER, [], reverse=True, udp=True) == [Route(REVERSE), Route(UDP)]
    assert UDP_RETRY_AFTER <= 10.0


def test_a_lost_peer_starts_afresh_and_the_snapshot_names_the_way_per_peer() -> None:
    book = PathBook(retry_after=60)
    book.succeeded("a", Route(REVERSE))
    book.succeeded("b", Route(RELAY, "r"))
    assert book.snapshot() == {"a": "reverse", "b": "relay:r"}
    book.forget("a")
    assert book.routes("a", 0.0, [], reverse=True) == [Route(DIRECT), Route(REVERSE)]


def test_a_peer_met_through_a_relay_gets_relays_only_and_a_failed_relay_is_tried_again() -> None:
    book = PathBook(retry_after=300.0)
    assert book.routes("a", 0.0, ["r"], reverse=False, direct=False) == [Route(RELAY, "r")]
    book.failed("a", Route(RELAY, "r"), 1.0)  # busy once: still the only way, not skipped for direct
    assert book.routes("a", 2.0, ["r"], reverse=False, direct=False) == [Route(RELAY, "r")]


# -- the relay -----------------------------------------------------------------------------------------------------
@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def _pair(made: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    made += [a, b]
    return a, b


def _relay(tmp_path: Path, **relay: object) -> tuple[Relay, TransportStats]:
    limits = Limits(relay=replace(RelayLimits(volunteer=True), **relay))  # type: ignore[arg-type]
    settings = TransportSettings("relay", "swarm", "arch", tmp_path, listen_host="127.0.0.10", limits=limits,
                                 max_model_bytes=1 << 20)
    table = PeerTable(8)
    table.add(PeerRecord("peer", b"k", b"m", ("127.0.0.11", 7001), 7001, 0.0, 1))
    stats = TransportStats()
    return Relay(settings, table, TaskRegistry(asyncio.get_running_loop(), "relay"), DropLog(stats, "relay", logging.getLogger("t"))), stats


async def _recv(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(5):
        while len(got) < n:
            chunk = await loop.sock_recv(sock, n - len(got))
            if not chunk:
                break
            got += chunk
    return got


async def _the_relay_splices_two_ends_of_one_offer_and_refuses_strangers(tmp_path: Path, pairs: list[socket.socket]) -> None:
    relay, stats = _relay(tmp_path)
    peer = ("127.0.0.11", 40000)
    (s_far, s_near), (r_far, r_near) = _pair(pairs), _pair(pairs)
    assert relay.join(b"o" * 20, s_near, peer) is True
    assert relay.join(b"o" * 20, r_near, peer) is True
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(s_far, b"model bytes")
    assert await _recv(r_far, 11) == b"model bytes"
    await loop.sock_sendall(r_far, b"request")
    assert await _recv(s_far, 7) == b"request"
    s_far.close()  # the sender is done: the splice ends and the recipient sees the end
    assert await _recv(r_far, 1) == b""
    assert relay.carried == 18 and relay.pairs == 0
    stranger, _ = _pair(pairs)
    assert relay.join(b"x" * 20, stranger, ("127.0.9.9", 1)) is False and stats.dropped == 1


async def _the_relay_bounds_waiting_ends_pairs_and_waiting_time(tmp_path: Path, pairs: list[socket.socket]) -> None:
    relay, _ = _relay(tmp_path, waiting=1, pairs=0, wait=0.05)
    peer = ("127.0.0.11", 40000)
    first = _pair(pairs)[1]
    assert relay.join(b"a" * 20, first, peer) is True
    assert relay.join(b"b" * 20, _pair(pairs)[1], peer) is False  # one may wait, not two
    assert relay.join(b"a" * 20, _pair(pairs)[1], peer) is False  # no pair may run (pairs=0): both ends closed
    assert relay.waiting == {} and first.fileno() == -1
    late = _pair(pairs)[1]
    assert relay.join(b"c" * 20, late, peer) is True
    async with asyncio.timeout(2):
        while relay.waiting:
            await asyncio.sleep(0.01)
    assert late.fileno() == -1  # its partner never came: closed after the wait


async def _a_pair_beyond_the_running_ones_waits_its_turn(tmp_path: Path, pairs: list[socket.socket]) -> None:
    relay, stats = _relay(tmp_path, pairs=1, wait=2.0)
    peer = ("127.0.0.11", 40000)
    (s1, s1_near), (r1, r1_near), (s2, s2_near), (r2, r2_near) = (_pair(pairs) for _ in range(4))
    for offer, near in ((b"a", s1_near), (b"a", r1_near), (b"b", s2_near), (b"b", r2_near)):
        assert relay.join(offer * 20, near, peer) is True
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(s2, b"second")
    await loop.sock_sendall(s1, b"first")
    assert await _recv(r1, 5) == b"first" and relay.queued == 1  # one runs, the other waits
    s1.close()  # the first transfer ends: the second one starts, its bytes already there
    assert await _recv(r2, 6) == b"second" and stats.dropped == 0


async def _a_node_that_does_not_volunteer_relays_nothing(tmp_path: Path, pairs: list[socket.socket]) -> None:
    relay, _ = _relay(tmp_path, volunteer=False)
    assert relay.join(b"o" * 20, _pair(pairs)[1], ("127.0.0.11", 1)) is False


def test_the_relay_splices_two_ends_of_one_offer_and_refuses_strangers(tmp_path: Path, pairs: list[socket.socket]) -> None:
    asyncio.run(_the_relay_splices_two_ends_of_one_offer_and_refuses_strangers(tmp_path, pairs))

def test_the_relay_bounds_waiting_ends_pairs_and_waiting_time(tmp_path: Path, pairs: list[socket.socket]) -> None:
    asyncio.run(_the_relay_bounds_waiting_ends_pairs_and_waiting_time(tmp_path, pairs))

def test_a_node_that_does_not_volunteer_relays_nothing(tmp_path: Path, pairs: list[socket.socket]) -> None:
    asyncio.run(_a_node_that_does_not_volunteer_relays_nothing(tmp_path, pairs))

def test_a_pair_beyond_the_running_ones_waits_its_turn(tmp_path: Path, pairs: list[socket.socket]) -> None:
    asyncio.run(_a_pair_beyond_the_running_ones_waits_its_turn(tmp_path, pairs))
