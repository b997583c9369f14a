"""The UDP way joins the race of the TCP ways (`Fetcher._race`) instead of waiting for all of them to fail.

The ways are fakes held open by futures the test releases: the real `Links.connect_any`, `PathBook` and
`Fetcher` decide, no network is touched and nothing waits on a timer beyond a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ipv8.keyvault.crypto import default_eccrypto

from quinkgl_cli.transport.base import TransferDone
from quinkgl_cli.transport.common import digest
from quinkgl_cli.transport.ipv8 import busy, stream
from quinkgl_cli.transport.ipv8 import fetcher as fetcher_module
from quinkgl_cli.transport.ipv8 import links as links_module
from quinkgl_cli.transport.ipv8.busy import JITTER, MAX_RETRIES, RETRY_MS, SenderBusy
from quinkgl_cli.transport.ipv8.channel import Ephemeral
from quinkgl_cli.transport.ipv8.fetcher import Fetcher, _Busy, _Failure
from quinkgl_cli.transport.ipv8.links import Links
from quinkgl_cli.transport.ipv8.paths import DIRECT, REVERSE, UDP, PathBook, Route
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.settings import TransportSettings

DEADLINE = 5.0  # seconds a race may take here before the test calls it hung
PAYLOAD = bytearray(b"model bytes")
GOT = (PAYLOAD, digest(PAYLOAD))


class FakeLinks(Links):
    """The real race of TCP routes (`connect_any`) and path memory, over routes that connect when told to."""

    def __init__(self, settings: TransportSettings, routes: list[Route] | None) -> None:
        """``routes``: the routes of every fetch; None: those the path book gives (direct, reverse and UDP known)."""
        self.settings = settings
        self.book = PathBook(300.0)
        self._routes = routes
        self.gates: dict[str, asyncio.Future[None]] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.socks: list[socket.socket] = []

    def routes(self, rec: PeerRecord) -> list[Route]:
        if self._routes is None:
            return self.book.routes(rec.node_id, time.monotonic(), [], reverse=True, udp=True)
        return list(self._routes)

    async def open(self, route: Route, rec: PeerRecord, p: Any) -> socket.socket:
        self.started.append(route.path)
        gate = self.gates.setdefault(route.path, asyncio.get_running_loop().create_future())
        try:
            await gate
        except asyncio.CancelledError:
            self.cancelled.append(route.path)
            raise
        ours, theirs = socket.socketpair()
        theirs.close()
        self.socks.append(ours)
        return ours


class FakeUdp:
    def __init__(self) -> None:
        self.result: asyncio.Future[tuple[bytearray, bytes]] | None = None
        self.cancelled = False
        self.busy: list[float] = []  # the sender's busy replies to come, one per request: their hints
        self.asked: list[float] = []  # when each request went

    async def fetch(self, rec: PeerRecord, p: Any) -> tuple[bytearray, bytes]:
        self.asked.append(time.monotonic())
        if self.busy:
            raise SenderBusy(UDP, self.busy.pop(0))
        self.result = asyncio.get_running_loop().create_future()
        try:
            return await self.result
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Race:
    def __init__(self, tmp_path: Path, routes: list[Route] | None) -> None:
        settings = TransportSettings("me", "swarm", "arch", tmp_path)
        self.links = FakeLinks(settings, routes)
        self.udp = FakeUdp()
        self.drops: list[tuple[str, str]] = []
        self.reports: list[TransferDone] = []
        self.exchange: asyncio.Future[tuple[bytearray, bytes] | _Failure | _Busy] | None = None
        self.fetcher = Fetcher(settings, default_eccrypto.generate_key("curve25519"), b"c" * 20, None,  # type: ignore[arg-type]
                               self.links, self.udp, SimpleNamespace(allows=lambda host: True), None, None, None,  # type: ignore[arg-type]
                               lambda event, peer, reason, **_: self.drops.append((event, reason)), None,  # type: ignore[arg-type]
                               self.reports.append)
        self.fetcher._exchange = self._exchange  # type: ignore[method-assign]
        # Never contacted: FakeLinks picks the routes and opens socket pairs.
        self.rec = PeerRecord("peer", b"key", b"mid", ("127.0.0.2", 7000), 7001, 0.0, 0)
        self.offer = SimpleNamespace(size=len(PAYLOAD), round=1, offer_id=b"o" * 16)

    async def _exchange(self, rec: PeerRecord, p: Any, sock: socket.socket,
                        route: Route) -> tuple[bytearray, bytes] | _Failure | _Busy:
        self.exchange = asyncio.get_running_loop().create_future()
        try:
            return await self.exchange
        finally:
            sock.close()

    def start(self) -> asyncio.Task[tuple[bytearray, bytes] | None]:
        return asyncio.ensure_future(asyncio.wait_for(self.fetcher._fetch_in_turn(self.rec, self.offer, time.monotonic() + 60),
                                                      DEADLINE))


async def until(check: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not check():
        assert loop.time() < deadline, "not reached before the deadline"
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def quick_stagger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher_module, "STAGGER", 0.02)
    monkeypatch.setattr(links_module, "STAGGER", 0.02)


async def _udp_starts_while_tcp_hangs_and_wins(tmp_path: Path) -> None:
    race = Race(tmp_path, [Route(DIRECT), Route(REVERSE), Route(UDP)])
    task = race.start()
    await until(lambda: race.udp.result is not None)
    assert race.links.started == [DIRECT, REVERSE]  # both TCP ways under way, neither answered
    assert race.udp.result is not None
    race.udp.result.set_result(GOT)
    assert await task == GOT
    assert sorted(race.links.cancelled) == [DIRECT, REVERSE]
    assert race.links.socks == []
    assert race.links.book.current("peer") == Route(UDP)
    # The TCP ways did not connect in all the time UDP took: not fresh, they wait their turn as failed ways do.
    now = time.monotonic()
    assert race.links.book.routes("peer", now, [], reverse=True, udp=True) == [Route(UDP)]
    assert race.links.book.routes("peer", now + 300, [], reverse=True, udp=True) == [Route(UDP), Route(DIRECT), Route(REVERSE)]
    assert [(r.path, r.ok) for r in race.reports] == [("udp", True)]
    assert race.drops == []


async def _tcp_connecting_first_has_the_transfer_to_itself(tmp_path: Path) -> None:
    race = Race(tmp_path, [Route(DIRECT), Route(UDP)])
    race.links.gates[DIRECT] = asyncio.get_running_loop().create_future()
    race.links.gates[DIRECT].set_result(None)
    task = race.start()
    await until(lambda: race.exchange is not None)
    assert race.exchange is not None
    race.exchange.set_result(GOT)
    assert await task == GOT
    assert race.udp.result is None  # never asked
    assert all(s.fileno() == -1 for s in race.links.socks) and len(race.links.socks) == 1
    assert race.links.book.current("peer") == Route(DIRECT)
    assert [(r.path, r.ok) for r in race.reports] == [("direct", True)]


async def _udp_then_direct(tmp_path: Path) -> tuple[Race, asyncio.Task[Any]]:
    """A race of direct TCP and UDP in which UDP started first and direct connected after it."""
    race = Race(tmp_path, [Route(DIRECT), Route(UDP)])
    task = race.start()
    await until(lambda: race.udp.result is not None)
    race.links.gates[DIRECT].set_result(None)
    await until(lambda: race.exchange is not None)
    return race, task


async def _tcp_connecting_after_udp_started_runs_beside_it_and_the_first_to_deliver_wins(tmp_path: Path) -> None:
    race, task = await _udp_then_direct(tmp_path)
    assert race.exchange is not None and race.udp.result is not None
    race.exchange.set_result(_Failure("refused_busy", {"path": DIRECT}))  # the sender took the UDP request first
    race.udp.result.set_result(GOT)
    assert await task == GOT
    assert all(s.fileno() == -1 for s in race.links.socks) and len(race.links.socks) == 1
    assert race.links.book.current("peer") == Route(UDP)
    assert race.links.book.routes("peer", 0.0, [], reverse=False, udp=True) == [Route(UDP), Route(DIRECT)]  # not failed
    assert [(r.path, r.ok) for r in race.reports] == [("udp", True)]
    assert race.drops == []


async def _tcp_delivering_first_cancels_the_udp_transfer(tmp_path: Path) -> None:
    race, task = await _udp_then_direct(tmp_path)
    assert race.exchange is not None
    race.exchange.set_result(GOT)
    assert await task == GOT
    assert race.udp.cancelled
    assert race.links.book.current("peer") == Route(DIRECT)
    assert [(r.path, r.ok) for r in race.reports] == [("direct", True)]


async def _both_failing_log_each_way_and_report_the_transfer_once(tmp_path: Path) -> None:
    race, task = await _udp_then_direct(tmp_path)
    assert race.exchange is not None and race.udp.result is not None
    race.exchange.set_result(_Failure("sender_vanished", {"path": DIRECT}))
    race.udp.result.set_exception(fetcher_module.stream.FetchError("sender_silent"))
    assert await task is None
    assert sorted(race.drops) == [("fetch-failed", "sender_silent"), ("fetch-failed", "sender_vanished")]
    assert race.links.book.current("peer") is None
    assert len(race.reports) == 1 and not race.reports[0].ok


def test_udp_starts_while_tcp_hangs_and_wins(tmp_path: Path) -> None:
    asyncio.run(_udp_starts_while_tcp_hangs_and_wins(tmp_path))


def test_tcp_connecting_first_has_the_transfer_to_itself(tmp_path: Path) -> None:
    asyncio.run(_tcp_connecting_first_has_the_transfer_to_itself(tmp_path))


def test_tcp_connecting_after_udp_started_runs_beside_it_and_the_first_to_deliver_wins(tmp_path: Path) -> None:
    asyncio.run(_tcp_connecting_after_udp_started_runs_beside_it_and_the_first_to_deliver_wins(tmp_path))


def test_tcp_delivering_first_cancels_the_udp_transfer(tmp_path: Path) -> None:
    asyncio.run(_tcp_delivering_first_cancels_the_udp_transfer(tmp_path))


def test_both_failing_log_each_way_and_report_the_transfer_once(tmp_path: Path) -> None:
    asyncio.run(_both_failing_log_each_way_and_report_the_transfer_once(tmp_path))


async def _a_way_outpaced_by_udp_leaves_udp_in_the_race_once_udp_failed(tmp_path: Path) -> None:
    race = Race(tmp_path, None)
    task = race.start()
    await until(lambda: race.udp.result is not None)
    assert race.udp.result is not None
    race.udp.result.set_result(GOT)  # the TCP ways still connecting: a network that drops TCP
    assert await task == GOT
    race.links.gates.clear()
    assert race.links.routes(race.rec) == [Route(UDP)]
    task = race.start()
    await until(lambda: race.udp.result is not None and not race.udp.result.done())
    race.udp.result.set_exception(fetcher_module.stream.FetchError("sender_silent"))
    assert await task is None
    # The remembered way failed once: the next offer races the TCP ways again, and UDP joins them.
    assert race.links.routes(race.rec) == [Route(DIRECT), Route(REVERSE), Route(UDP)]
    race.links.gates.clear()
    race.udp.result = None
    task = race.start()
    await until(lambda: race.udp.result is not None)
    assert race.udp.result is not None
    race.udp.result.set_result(GOT)
    assert await task == GOT


async def _a_busy_sender_is_asked_again_after_its_hint(tmp_path: Path) -> None:
    """With the jitter drawn at its largest: the wait is the hint and half of it more."""
    race = Race(tmp_path, [Route(UDP)])
    race.udp.busy = [0.05]
    task = race.start()
    await until(lambda: race.udp.result is not None)
    assert race.udp.result is not None
    race.udp.result.set_result(GOT)
    assert await task == GOT
    assert len(race.udp.asked) == 2 and race.udp.asked[1] - race.udp.asked[0] >= 0.05 * (1 + JITTER)
    assert race.drops == []
    assert [(r.path, r.ok) for r in race.reports] == [("udp", True)]


async def _a_sender_busy_every_time_is_asked_a_bounded_number_of_times_and_its_way_not_failed(tmp_path: Path) -> None:
    race = Race(tmp_path, None)
    race.links.book.succeeded("peer", Route(UDP))
    race.udp.busy = [0.01] * 100
    assert await race.start() is None
    assert len(race.udp.asked) == MAX_RETRIES + 1
    assert race.drops == [("fetch-failed", "sender_busy")]
    assert [(r.path, r.ok) for r in race.reports] == [("udp", False)]
    assert race.links.book.current("peer") == Route(UDP)  # busy is no failure: the way stays the one to take
    # Nor past the offer's life: a hint that would outlast it ends the fetch at once.
    race.udp.asked.clear()
    got = await asyncio.wait_for(race.fetcher._fetch_in_turn(race.rec, race.offer, time.monotonic() + 0.005), DEADLINE)
    assert got is None and len(race.udp.asked) == 1


async def _a_tcp_sender_answering_busy_is_asked_again_and_its_way_kept(tmp_path: Path) -> None:
    race = Race(tmp_path, None)
    ours, theirs = socket.socketpair()
    # The sender's end: its challenge, then BUSY to whatever request follows (both wait in the socket's buffer).
    theirs.sendall(stream.CHALLENGE.pack(stream.CHALLENGE_MAGIC, stream.PROTOCOL, stream.new_nonce(), Ephemeral().public)
                   + stream.RESPONSE.pack(stream.BUSY, 0))
    ours.setblocking(False)
    got = await Fetcher._exchange(race.fetcher, race.rec, race.offer, ours, Route(DIRECT))  # type: ignore[arg-type]
    theirs.close()
    assert got == _Busy(RETRY_MS / 1000) and ours.fileno() == -1
    # In the fetch: the offer is asked for again after the hint, by the same way, which is not failed.
    race.links.gates[DIRECT] = asyncio.get_running_loop().create_future()
    race.links.gates[DIRECT].set_result(None)
    task = race.start()
    await until(lambda: race.exchange is not None)
    assert race.exchange is not None
    first, race.exchange = race.exchange, None
    first.set_result(_Busy(0.01))
    await until(lambda: race.exchange is not None)
    assert race.exchange is not None
    race.exchange.set_result(GOT)
    assert await task == GOT
    assert race.links.started == [DIRECT, DIRECT] and race.udp.asked == []
    assert race.links.book.current("peer") == Route(DIRECT)
    assert race.drops == [] and [(r.path, r.ok) for r in race.reports] == [("direct", True)]


def test_a_tcp_sender_answering_busy_is_asked_again_and_its_way_kept(tmp_path: Path) -> None:
    asyncio.run(_a_tcp_sender_answering_busy_is_asked_again_and_its_way_kept(tmp_path))


def test_a_way_outpaced_by_udp_leaves_udp_in_the_race_once_udp_failed(tmp_path: Path) -> None:
    asyncio.run(_a_way_outpaced_by_udp_leaves_udp_in_the_race_once_udp_failed(tmp_path))


def test_a_busy_sender_is_asked_again_after_its_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busy._draw, "random", lambda: 1.0)
    asyncio.run(_a_busy_sender_is_asked_again_after_its_hint(tmp_path))


def test_a_sender_busy_every_time_is_asked_a_bounded_number_of_times_and_its_way_not_failed(tmp_path: Path) -> None:
    asyncio.run(_a_sender_busy_every_time_is_asked_a_bounded_number_of_times_and_its_way_not_failed(tmp_path))
