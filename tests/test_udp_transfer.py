"""Model transfers over the punched UDP way (`udpway`, `udpsend`, `udprecv`, `udpwire`), in memory: two ends
joined by a network that loses, reorders, duplicates and corrupts datagrams on demand, and a stranger injecting
its own. Each end takes what arrives as its endpoint does: a chunk of one of its transfers first (sealed under the
transfer's key), a control datagram next; anything else is foreign (the swarm seal would refuse it). The real
endpoints and the NAT lab run the same parts (`test_natlab_e2e.py`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.transport.base import TransferDone, TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8 import stream, udpwire
from quinkgl_cli.transport.ipv8.busy import RETRY_MS, BusyReplies, SenderBusy
from quinkgl_cli.transport.ipv8.channel import Ephemeral
from quinkgl_cli.transport.ipv8.outbox import Outbox, Outgoing
from quinkgl_cli.transport.ipv8.payloads import OfferPayload, UdpPullPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.settings import Limits, TransportSettings
from quinkgl_cli.transport.ipv8.udprecv import ACK_EVERY, Receiving
from quinkgl_cli.transport.ipv8.udpsend import DUPTHRESH, MIN_WINDOW, Congestion, Flight
from quinkgl_cli.transport.ipv8.udpway import SENDS, SENDS_PER_PEER, UdpWay
from quinkgl_cli.transport.ipv8.udpwire import CHUNK, WINDOW, TransferKeys, WireError

A, B, STRANGER = ("127.0.0.1", 7001), ("127.0.0.2", 7002), ("127.0.0.3", 7003)
CID = b"c" * 20
log = logging.getLogger("test.udp")


class Net:
    """Datagrams between addresses in one event loop, lost, delayed (reordered), doubled or altered as asked."""

    def __init__(self, seed: int = 0, loss: float = 0.0, reorder: float = 0.0, dup: float = 0.0, corrupt: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.loss, self.reorder, self.dup, self.corrupt = loss, reorder, dup, corrupt
        self.handlers: dict[tuple[str, int], Callable[[tuple[str, int], bytes], None]] = {}
        self.cut: set[tuple[str, int]] = set()  # addresses whose datagrams no longer go anywhere (a vanished end)
        self.sent: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
        self.altered = 0

    def wire(self, me: tuple[str, int]) -> Wire:
        return Wire(self, me)

    def deliver(self, src: tuple[str, int], dst: tuple[str, int], packet: bytes) -> None:
        self.sent.append((src, dst, packet))
        if src in self.cut or dst in self.cut or self.rng.random() < self.loss:
            return
        if self.rng.random() < self.corrupt:
            at = self.rng.randrange(udpwire.HEAD.size, len(packet))
            packet = packet[:at] + bytes([packet[at] ^ 0x40]) + packet[at + 1:]
            self.altered += 1
        copies = 2 if self.rng.random() < self.dup else 1
        loop = asyncio.get_running_loop()
        for _ in range(copies):
            delay = self.rng.random() * 0.004 if self.rng.random() < self.reorder else 0.0
            loop.call_later(delay, self._arrive, src, dst, packet)

    def _arrive(self, src: tuple[str, int], dst: tuple[str, int], packet: bytes) -> None:
        handler = self.handlers.get(dst)
        if handler is not None:
            handler(src, packet)


class Wire:
    def __init__(self, net: Net, me: tuple[str, int]) -> None:
        self.net, self.me = net, me

    def send(self, address: tuple[str, int], packet: bytes) -> None:
        self.net.deliver(self.me, address, packet)

    def send_sealed(self, address: tuple[str, int], datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            self.send(address, datagram)

    def queued(self) -> int:
        return 0


class Key:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def key_to_bin(self) -> bytes:
        return self.raw


class Courier:
    """Signed messages between the two ends, without the signatures: a pull goes to the sender's `on_pull`."""

    def __init__(self, net: Net, me: tuple[str, int]) -> None:
        self.net, self.me = net, me
        self.pulls = 0
        self.deliver: Callable[[UdpPullPayload], None] | None = None

    def stamp(self) -> tuple[int, int]:
        return 1, 1

    def send(self, address: tuple[str, int], payload: Any) -> None:
        self.pulls += 1
        if self.deliver is not None and self.me not in self.net.cut and address not in self.net.cut:
            asyncio.get_running_loop().call_soon(self.deliver, payload)


class End:
    """One peer's UDP way, with what it reported and refused."""

    def __init__(self, name: str, address: tuple[str, int], net: Net, tmp: Path, **settings: Any) -> None:
        limits = Limits(stall_window=settings.pop("stall_window", 0.4))
        self.settings = TransportSettings(name, "swarm", "arch", tmp / name, limits=limits, **settings)
        self.stats = TransportStats()
        self.reports: list[TransferDone] = []
        self.courier = Courier(net, address)
        self.table = PeerTable(8)
        drops = DropLog(self.stats, name, log)
        self.outbox = Outbox(self.settings, self.table, self.courier, drops, 0)  # type: ignore[arg-type]
        self.busy = BusyReplies(self.settings, self.courier, drops)  # type: ignore[arg-type]
        self.way = UdpWay(self.settings, CID, self.courier, self.outbox, net.wire(address),  # type: ignore[arg-type]
                          TaskRegistry(asyncio.get_running_loop(), name), drops, self.stats, lambda k: False,
                          self.reports.append, self.busy)
        self.foreign = 0  # datagrams that were neither a chunk of ours nor a control datagram
        net.handlers[address] = self.receive

    def receive(self, src: tuple[str, int], datagram: bytes) -> None:
        if self.way.take(src, datagram):
            return
        if datagram[:4] == udpwire.MAGIC:
            self.way.on_datagram(src, datagram)
        else:
            self.foreign += 1


def _is_chunk(packet: bytes) -> bool:
    return packet[:4] != udpwire.MAGIC


def _is_ack(packet: bytes) -> bool:
    return packet[:4] == udpwire.MAGIC and packet[4] == udpwire.ACK


def _cut_after(net: Net, count: int, host: tuple[str, int]) -> None:
    """Cut ``host`` off the network once ``count`` datagrams have reached B (a peer that vanishes mid-transfer)."""
    real = net.handlers[B]
    seen = 0

    def counting(src: tuple[str, int], packet: bytes) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            net.cut.add(host)
        real(src, packet)

    net.handlers[B] = counting


def _record(name: str, address: tuple[str, int], via: str | None = None) -> PeerRecord:
    rec = PeerRecord(name, f"key-{name}".encode(), b"m" * 20, address, 0, 0.0, 1, public_key=Key(f"key-{name}".encode()))
    rec.via = via
    return rec


def _offer(sender: End, to: PeerRecord, payload: bytes) -> OfferPayload:
    offer_id = os.urandom(20)
    sender.outbox.offers[offer_id] = Outgoing(offer_id, to.node_id, to.public_key, payload, len(payload), (), to.address,
                                              0.0, 0.0, round=3)
    return OfferPayload("swarm", 1, 1, offer_id, 3, "a", to.node_id, b"m" * 20, len(payload),
                        hashlib.sha256(payload).digest(), "raw", 1, b"{}", 0)


def _pair(net: Net, tmp: Path, **settings: Any) -> tuple[End, End, PeerRecord, PeerRecord]:
    """Sender ``a`` at A, recipient ``b`` at B, each knowing the other."""
    a, b = End("a", A, net, tmp, **settings), End("b", B, net, tmp, **settings)
    rec_a, rec_b = _record("a", A), _record("b", B)  # b's view of a, a's view of b
    b.courier.deliver = lambda p: a.way.on_pull(rec_b, p)
    return a, b, rec_a, rec_b


async def _transfer(net: Net, tmp: Path, size: int, **settings: Any) -> tuple[End, End, bytes, tuple[bytearray, bytes]]:
    a, b, rec_a, rec_b = _pair(net, tmp, **settings)
    payload = os.urandom(size)
    got = await asyncio.wait_for(b.way.fetch(rec_a, _offer(a, rec_b, payload)), 20)
    return a, b, payload, got


async def _settled(end: End) -> None:
    async with asyncio.timeout(5):
        while end.way.sending:
            await asyncio.sleep(0.01)


# -- whole transfers -------------------------------------------------------------------------------------------
def test_a_model_crosses_in_chunks_and_the_sender_reports_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        net = Net()
        a, _b, payload, (buf, digest) = await _transfer(net, tmp_path, 300_000)
        assert bytes(buf) == payload and digest == hashlib.sha256(payload).digest()
        await _settled(a)
        assert [(r.direction, r.path, r.ok) for r in a.reports] == [("send", "udp", True)]
        assert a.outbox.offers == {} and a.stats.models_sent == 1
        data = [p for s, _d, p in net.sent if s == A and _is_chunk(p)]
        # Nothing is lost here; a chunk goes twice only when its acknowledgement came late (a loaded machine), and
        # the sender says so.
        sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("udp-sent ")]
        assert len(sent) == 1 and f"datagrams={len(data)} " in sent[0], sent
        assert len(data) == udpwire.chunks(300_000) + int(sent[0].split("resent=")[1].split()[0])
        assert all(len(p) <= CHUNK + udpwire.DATA_OVERHEAD for p in data)
        assert not any(payload[:64] in p for p in data)  # the chunks travel encrypted
    with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
        asyncio.run(run())


def test_lost_datagrams_are_sent_again(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net(seed=1, loss=0.1)  # both ways: chunks, acknowledgements, STARTs
        a, _b, payload, (buf, digest) = await _transfer(net, tmp_path, 400_000, stall_window=2.0)
        assert bytes(buf) == payload and digest == hashlib.sha256(payload).digest()
        await _settled(a)
        assert [(r.path, r.ok) for r in a.reports] == [("udp", True)]
        data = [p for s, _d, p in net.sent if s == A and _is_chunk(p)]
        assert len(data) > udpwire.chunks(400_000) * 1.05  # the lost ones went again
    asyncio.run(run())


def test_reordered_and_doubled_datagrams_are_put_in_place_once(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net(seed=2, reorder=0.5, dup=0.3)
        _a, b, payload, (buf, digest) = await _transfer(net, tmp_path, 250_000)
        assert bytes(buf) == payload and digest == hashlib.sha256(payload).digest()
    asyncio.run(run())


def test_altered_datagrams_are_refused_and_the_model_still_arrives_intact(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net(seed=3, corrupt=0.05)
        _a, b, payload, (buf, digest) = await _transfer(net, tmp_path, 250_000, stall_window=2.0)
        assert net.altered > 0 and b.foreign > 0  # an altered chunk opens under no key: not ours
        assert bytes(buf) == payload and digest == hashlib.sha256(payload).digest()
    asyncio.run(run())


def test_a_stranger_replaying_or_forging_datagrams_changes_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path)
        payload = os.urandom(120_000)
        injected = 0
        other, _ = _keys()  # another transfer's key

        def stranger(src: tuple[str, int], packet: bytes) -> None:  # sees a's datagrams and sends its own
            nonlocal injected
            if _is_chunk(packet) and injected < 20:
                injected += 1
                assert not b.way.take(STRANGER, packet)  # a's own chunk, from another address: no transfer from there
                forged = packet[:udpwire.NONCE_BYTES] + os.urandom(len(packet) - udpwire.NONCE_BYTES)
                assert not b.way.take(A, forged)  # from a's address, but not sealed with the transfer's key
                assert not b.way.take(A, other.data(3, os.urandom(CHUNK)))  # under another key
                assert not b.way.take(A, packet[:udpwire.DATA_OVERHEAD - 1])  # too short to be a chunk

        real = net.handlers[B]
        net.handlers[B] = lambda src, p: (stranger(src, p), real(src, p))  # type: ignore[func-returns-value]
        buf, _digest = await asyncio.wait_for(b.way.fetch(rec_a, _offer(a, rec_b, payload)), 20)
        assert bytes(buf) == payload
        assert injected == 20 and b.way.refused == 0
        b.way.on_datagram(A, b"QGLU\x09" + b"x" * 30)  # not a transfer datagram at all
        b.way.on_datagram(A, udpwire.HEAD.pack(udpwire.MAGIC, 2, b"t" * 8) + bytes(40))  # a chunk sealed the old way
        assert b.way.refused == 2
    asyncio.run(run())


def test_a_lost_last_acknowledgement_costs_one_probe_not_the_window_again(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path)
        real = net.handlers[A]
        acks = 0

        def drop_the_data_ack(src: tuple[str, int], packet: bytes) -> None:
            nonlocal acks
            if _is_ack(packet):
                acks += 1
                if acks == 2:  # the first answers the START, the second all ten chunks
                    return
            real(src, packet)

        net.handlers[A] = drop_the_data_ack
        payload = os.urandom(10 * CHUNK)
        buf, _digest = await asyncio.wait_for(b.way.fetch(rec_a, _offer(a, rec_b, payload)), 5)
        assert bytes(buf) == payload
        await _settled(a)  # the ended transfer still answers the probe
        data = [p for s, _d, p in net.sent if s == A and _is_chunk(p)]
        assert len(data) == 11 and [(r.path, r.ok) for r in a.reports] == [("udp", True)]  # not 20: no timeout
    asyncio.run(run())


def test_stragglers_of_a_transfer_that_ended_are_dropped_without_a_word(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path)
        await b.way.fetch(rec_a, _offer(a, rec_b, os.urandom(5 * CHUNK)))
        await _settled(a)
        (tid,) = a.way.sent
        late_ack = udpwire.HEAD.pack(udpwire.MAGIC, udpwire.ACK, tid) + bytes(60)
        a.way.on_datagram(B, late_ack)  # an acknowledgement still on its way when the sender finished
        assert a.way.refused == 0 and a.stats.dropped == 0
        a.way.on_datagram(B, udpwire.HEAD.pack(udpwire.MAGIC, udpwire.ACK, b"x" * 8) + bytes(60))
        assert a.way.refused == 1  # for no transfer we ran: refused and counted
    asyncio.run(run())


# -- ends that go away -----------------------------------------------------------------------------------------
def test_a_sender_that_vanishes_mid_transfer_fails_the_fetch_within_a_stall_window(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, stall_window=0.3)
        payload = os.urandom(2_000_000)
        _cut_after(net, 200, A)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(stream.FetchError) as failed:
            await asyncio.wait_for(b.way.fetch(rec_a, _offer(a, rec_b, payload)), 10)
        assert failed.value.reason == "sender_vanished" and loop.time() - started < 3
        assert b.way.receiver.active == {} and b.way.receiver.ended == {}  # nothing kept of a failed transfer
        (tid,) = b.way.receiver.failed
        (failed_r,) = b.way.receiver.keyed[A]
        refused = b.way.refused
        assert failed_r.keys is not None and failed_r.tid == tid
        assert b.way.take(A, failed_r.keys.data(5, b"x" * CHUNK))  # a chunk sent before it went: dropped quietly
        assert b.way.refused == refused
    asyncio.run(run())


def test_a_sender_that_never_answers_is_silent_after_the_connect_timeout(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, connect_timeout=0.6)
        b.courier.deliver = None  # the pull never reaches it
        with pytest.raises(stream.FetchError) as failed:
            await b.way.fetch(rec_a, _offer(a, rec_b, b"x" * 5000))
        assert failed.value.reason == "sender_silent" and b.courier.pulls >= 2  # asked again before giving up
    asyncio.run(run())


def test_a_recipient_that_gives_up_stops_the_sender_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, fetch_timeout=30.0)
        task = asyncio.ensure_future(b.way.fetch(rec_a, _offer(a, rec_b, os.urandom(3_000_000))))
        async with asyncio.timeout(5):
            while not a.way.sending:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        task.cancel()  # the recipient stops (its transport stops, say): it tells the sender
        with pytest.raises(asyncio.CancelledError):
            await task
        await _settled(a)  # long before the sender's own 30 s silence timeout
        assert [(r.path, r.ok) for r in a.reports] == [("udp", False)]
        assert a.outbox.offers == {}
    asyncio.run(run())


def test_a_recipient_that_falls_silent_fails_the_send(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, fetch_timeout=0.5)
        offer = _offer(a, rec_b, os.urandom(2_000_000))
        _cut_after(net, 100, B)  # b is gone: no abort, nothing
        task = asyncio.ensure_future(b.way.fetch(rec_a, offer))
        async with asyncio.timeout(5):
            while not a.way.sending:
                await asyncio.sleep(0.001)
        await _settled(a)
        assert [(r.path, r.ok) for r in a.reports] == [("udp", False)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(run())


# -- the sender's checks and bounds ----------------------------------------------------------------------------
def test_a_pull_is_served_only_for_our_offer_to_its_signer_directly_and_within_bounds(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a = End("a", A, net, tmp_path)
        rec_b, rec_c = _record("b", B), _record("c", STRANGER)
        offer = _offer(a, rec_b, b"x" * 10_000)
        pull = UdpPullPayload("swarm", 1, 1, offer.offer_id, 8, Ephemeral().public)
        a.way.on_pull(rec_c, pull)  # c signed it, the offer is b's
        a.way.on_pull(rec_b, UdpPullPayload("swarm", 1, 1, b"u" * 20, 8, Ephemeral().public))  # no such offer
        a.way.on_pull(_record("b", B, via="relay1"), pull)  # b reaches us only through a relay
        assert a.way.sending == {} and a.stats.dropped == 3
        others = [_record(f"p{i}", ("127.0.0.9", 9000 + i)) for i in range(SENDS + 1)]
        for i, rec in enumerate(others):
            o = _offer(a, rec, b"y" * 10_000)
            a.way.on_pull(rec, UdpPullPayload("swarm", 1, 1, o.offer_id, i, Ephemeral().public))
        assert len(a.way.sending) == SENDS and a.stats.dropped == 4  # one too many: busy
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    asyncio.run(run())


def test_one_recipient_that_never_answers_holds_one_send_not_all(tmp_path: Path) -> None:
    """A recipient asks for its offers over UDP and never acknowledges: each send lasts until given up on (10 s),
    and with an offer a round it held every send, so every other peer fetching over UDP was answered busy."""
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, connect_timeout=30.0)
        rec_c = _record("c", STRANGER)
        for i in range(SENDS):
            o = _offer(a, rec_c, b"y" * 10_000)
            a.way.on_pull(rec_c, UdpPullPayload("swarm", 1, 1, o.offer_id, i, Ephemeral().public))
        assert len(a.way.sending) == SENDS_PER_PEER
        got = await asyncio.wait_for(b.way.fetch(rec_a, _offer(a, rec_b, b"x" * 10_000)), 10)
        assert bytes(got[0]) == b"x" * 10_000
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    asyncio.run(run())


def test_a_sender_with_every_send_taken_answers_busy_and_the_recipient_stops_asking_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, connect_timeout=30.0)  # silence would hold b far past the deadline
        a.courier.deliver = lambda p: b.busy.on_busy(rec_a, p)
        for i in range(SENDS):  # every send taken by transfers to peers that never answer
            rec_c = _record(f"c{i}", ("127.0.0.9", 9000 + i))
            o = _offer(a, rec_c, b"y" * 10_000)
            a.way.on_pull(rec_c, UdpPullPayload("swarm", 1, 1, o.offer_id, i, Ephemeral().public))
        assert len(a.way.sending) == SENDS
        offer = _offer(a, rec_b, b"x" * 10_000)
        with pytest.raises(SenderBusy) as busy:
            await asyncio.wait_for(b.way.fetch(rec_a, offer), 5)
        assert busy.value.retry == RETRY_MS / 1000 and b.courier.pulls == 1
        assert a.busy.sent == 1 and not a.outbox.offers[offer.offer_id].serving  # still there to be asked again
        assert b.way.receiver.active == {}
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    asyncio.run(run())


def test_the_recipient_holds_a_bounded_number_of_transfers(tmp_path: Path) -> None:
    async def run() -> None:
        net = Net()
        a, b, rec_a, rec_b = _pair(net, tmp_path, max_concurrent_fetches=1)
        b.courier.deliver = None
        first = asyncio.ensure_future(b.way.fetch(rec_a, _offer(a, rec_b, b"x" * 100)))
        await asyncio.sleep(0)
        with pytest.raises(stream.FetchError) as failed:
            await b.way.fetch(rec_a, _offer(a, rec_b, b"x" * 100))
        assert failed.value.reason == "busy"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    asyncio.run(run())


# -- the pieces ------------------------------------------------------------------------------------------------
def _keys() -> tuple[TransferKeys, TransferKeys]:
    mine, theirs = Ephemeral(), Ephemeral()
    return (TransferKeys.derive(mine, theirs.public, b"ctx", b"t" * 8), TransferKeys.derive(theirs, mine.public, b"ctx", b"t" * 8))


def test_the_receiver_refuses_chunks_outside_the_offer_or_the_window_or_of_the_wrong_length() -> None:
    async def run() -> None:
        sender_keys, _ = _keys()
        size = (WINDOW + 10) * CHUNK + 7
        r = Receiving(b"t" * 8, A, size, Ephemeral(), b"", Net().wire(B))
        r.keys = sender_keys  # as agreed by a START
        for seq, chunk, reason in ((WINDOW + 11, b"x" * CHUNK, "out_of_window"), (WINDOW, b"x" * CHUNK, "out_of_window"),
                                   (0, b"x" * (CHUNK + 1), "wrong_length"), (WINDOW + 10, b"x" * CHUNK, "out_of_window")):
            with pytest.raises(WireError) as refused:
                r.take(sender_keys.data(seq, chunk))
            assert refused.value.reason == reason
        assert len(r.buf) == size and r.got == 0  # the buffer never grows past the offered size
        assert r.take(sender_keys.data(1, b"y" * CHUNK))
        assert r.got == 1 and r.cum == 0 and bytes(r.buf[CHUNK:2 * CHUNK]) == b"y" * CHUNK
        r.close()
    asyncio.run(run())


def test_a_chunk_under_the_wrong_key_or_altered_is_not_taken_and_its_place_stays_open() -> None:
    async def run() -> None:
        sender_keys, _ = _keys()
        other, _ = _keys()
        r = Receiving(b"t" * 8, A, 4 * CHUNK, Ephemeral(), b"", Net().wire(B))
        r.keys = sender_keys
        good = sender_keys.data(2, b"z" * CHUNK)
        moved = good[:udpwire.PREFIX_BYTES + 4] + (1).to_bytes(4, "little") + good[udpwire.NONCE_BYTES:]
        altered = good[:-1] + bytes([good[-1] ^ 1])
        for wrong in (other.data(2, b"w" * CHUNK), moved, altered):
            assert not r.take(wrong)  # not ours: it goes on to the swarm seal
        assert r.got == 0 and not r.have[1] and not r.have[2]
        assert r.take(good) and bytes(r.buf[2 * CHUNK:3 * CHUNK]) == b"z" * CHUNK and r.got == 1
        assert r.take(good) and r.got == 1  # again: only acknowledged
        r.close()
        assert r.view is None and r.take(good)  # ended well: a repeated chunk is still acknowledged, nothing written
    asyncio.run(run())


def test_chunk_nonces_never_repeat_even_for_a_chunk_sent_again() -> None:
    sender_keys, _ = _keys()
    datagrams = [sender_keys.data(0, b"a" * CHUNK), sender_keys.data(0, b"a" * CHUNK, push=True),
                 sender_keys.data(0, b"a" * CHUNK)]
    nonces = {d[:udpwire.NONCE_BYTES] for d in datagrams}
    assert len(nonces) == 3 and len({d[udpwire.NONCE_BYTES:] for d in datagrams}) == 3
    assert [udpwire.data_tail(d) for d in datagrams] == [(False, 0), (True, 0), (False, 0)]
    assert b"a" * 64 not in b"".join(datagrams)


def test_an_acknowledgement_replayed_or_overtaken_is_refused() -> None:
    sender_keys, recipient_keys = _keys()
    first = recipient_keys.ack(b"t" * 8, 3, bytes(udpwire.BITMAP_BYTES))
    second = recipient_keys.ack(b"t" * 8, 5, bytes(udpwire.BITMAP_BYTES))
    assert sender_keys.open_ack(second) == (5, 0)
    with pytest.raises(WireError):
        sender_keys.open_ack(first)
    with pytest.raises(WireError):
        sender_keys.open_ack(second)


def test_selective_acknowledgements_declare_a_chunk_lost_after_three_later_ones_arrived() -> None:
    flight = Flight(20)
    for t in range(10):
        seq, resent = flight.next() or (-1, False)
        flight.sent(seq, float(t), resent)
    # 0 arrived, 1 did not, 2 and 3 did: not yet lost (two later ones)
    newly, sample, lost = flight.on_ack(1, 0b11, 5.0)
    assert (newly, lost, flight.cum) == (3, -1, 1) and sample == pytest.approx(2.0)
    assert 1 in flight.inflight
    newly, _sample, lost = flight.on_ack(1, 0b111, 6.0)  # 4 too: three after 1 arrived
    assert newly == 1 and lost == 1 and list(flight.lost) == [1] and DUPTHRESH == 3
    assert flight.next() == (1, True)  # the lost chunk goes again before any new one


def test_with_few_chunks_out_a_missing_one_is_lost_once_the_others_arrived() -> None:
    flight = Flight(3)
    for t in range(3):
        seq, resent = flight.next() or (-1, False)
        flight.sent(seq, float(t), resent)
    _newly, _sample, lost = flight.on_ack(0, 0b11, 5.0)  # 1 and 2 arrived, 0 did not: no third one will ever come
    assert lost == 0 and list(flight.lost) == [0]


def test_congestion_halves_once_per_loss_event_and_collapses_on_timeout() -> None:
    c = Congestion()
    c.grew(100)
    assert c.window == 116  # slow start: one more per chunk acknowledged
    c.lost(tx=50, latest_tx=200)
    assert c.window == 58
    c.lost(tx=120, latest_tx=210)  # the same loss event (sent before we reacted): no second halving
    assert c.window == 58
    c.grew(58)
    assert c.window == 59  # congestion avoidance: one chunk per window acknowledged
    c.lost(tx=300, latest_tx=400)
    assert c.window == 29
    c.timed_out(latest_tx=500)
    assert c.window == MIN_WINDOW


def test_the_last_chunk_of_a_burst_is_acknowledged_at_once_the_others_in_groups() -> None:
    async def run() -> None:
        sender_keys, _ = _keys()
        net = Net()
        r = Receiving(b"t" * 8, A, 40 * CHUNK, Ephemeral(), b"", net.wire(B))
        r.keys = sender_keys
        acks = lambda: [p for _s, _d, p in net.sent if _is_ack(p)]  # noqa: E731
        for seq in range(3):
            r.take(sender_keys.data(seq, b"x" * CHUNK))
        assert acks() == [] and r.timer is not None  # in order, fewer than ACK_EVERY: the delayed ack waits
        r.take(sender_keys.data(3, b"x" * CHUNK, push=True))
        assert len(acks()) == 1 and r.timer is None  # a burst's end: at once (a small window must not wait)
        for seq in range(4, 4 + ACK_EVERY):
            r.take(sender_keys.data(seq, b"x" * CHUNK))
        assert len(acks()) == 2  # ACK_EVERY in order: one acknowledgement
        r.close()
    asyncio.run(run())
