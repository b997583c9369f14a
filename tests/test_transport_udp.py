"""The UDP way wired into the IPv8 transport, on loopback: when no TCP way connects, a model comes over the UDP
sockets the peers already talk on, is logged ``transfer path=udp``, and the way is remembered for that sender.

Loopback has no NAT, so the transport offers only ``direct`` there: the test closes the sender's TCP port and lets
the recipient consider UDP as it does off loopback. The NAT lab runs the real case (`test_natlab_e2e.py`)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from quinkgl_cli.transport.base import TransferDone
from quinkgl_cli.transport.ipv8 import udpwire
from quinkgl_cli.transport.ipv8.channel import Ephemeral
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard, GuardedUDPEndpoint
from quinkgl_cli.transport.ipv8.paths import UDP, Route
from quinkgl_cli.transport.ipv8.seal import DatagramSeal
from quinkgl_cli.transport.ipv8.udprecv import Receiving, UdpReceiver
from tests.test_transport_contract import Cluster, _upd, run_cluster, wait_until


def test_with_no_tcp_way_the_model_comes_over_udp_and_the_way_is_kept(tmp_path, caplog):
    async def body(c: Cluster):
        a, _ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        links = b.parts.links
        links.routes = lambda rec: links.book.routes(rec.node_id, time.monotonic(), [], reverse=False, udp=True)
        a.parts.server.close()  # nothing connects to a's TCP port any more
        sent: list[TransferDone] = []
        got: list[TransferDone] = []
        a.on_transfer, b.on_transfer = sent.append, got.append
        first, second = os.urandom(300_000), os.urandom(200_000)
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            a.send_model("b", _upd(round_=1, payload=first))
            await wait_until(lambda: rb.models, timeout=15, what="the first model over udp")
            assert bytes(rb.models[0].payload) == first
            assert "transfer peer=a path=udp" in caplog.text
            assert "path-failed peer=a path=direct" in caplog.text  # TCP first, then UDP
            assert links.book.current("a") == Route(UDP)
            caplog.clear()
            a.send_model("b", _upd(round_=2, payload=second))
            await wait_until(lambda: len(rb.models) == 2, timeout=15, what="the second model")
            assert bytes(rb.models[1].payload) == second
            assert "path-failed" not in caplog.text  # the remembered way first: no TCP attempt this time
            await wait_until(lambda: len(sent) == 2, timeout=5, what="the sender's reports")
        assert [(d.path, d.ok) for d in got] == [("udp", True), ("udp", True)]
        assert [(d.direction, d.path, d.ok, d.round) for d in sent] == [("send", "udp", True, 1), ("send", "udp", True, 2)]
        assert a.parts.udp.sending == {} and b.parts.udp.refused == 0

    run_cluster("ipv8", tmp_path, body)


class _Socket:
    """The endpoint's socket, counting segmented sends; ``refuse``: a system without UDP segmentation offload."""

    def __init__(self, sock, refuse: bool) -> None:
        self.sock = sock
        self.refuse = refuse
        self.calls = 0

    def recvfrom(self, n: int):
        return self.sock.recvfrom(n)

    def sendmsg(self, *args):
        self.calls += 1
        if self.refuse:
            raise OSError(92, "Protocol not available")
        return self.sock.sendmsg(*args)


def test_chunks_go_in_segmented_sends_and_one_by_one_where_the_system_refuses(tmp_path):
    async def body(c: Cluster):
        a, _ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        links = b.parts.links
        links.routes = lambda rec: [Route(UDP)]
        endpoint = a.parts.endpoint
        real = endpoint._sock
        segmenting = endpoint._sock = _Socket(real, refuse=False)
        sent_before = endpoint.bytes_up
        first = os.urandom(500_000)  # 417 chunks
        a.send_model("b", _upd(round_=1, payload=first))
        await wait_until(lambda: rb.models, timeout=15, what="the model, segmented")
        assert bytes(rb.models[0].payload) == first and endpoint._segmenting  # Linux: the kernel cut them apart
        assert 9 <= segmenting.calls <= 60  # up to 48 chunks a call, not one each
        assert endpoint.bytes_up - sent_before > len(first)  # counted, as one-by-one sends are
        plain = endpoint._sock = _Socket(real, refuse=True)
        second = os.urandom(500_000)
        a.send_model("b", _upd(round_=2, payload=second))
        await wait_until(lambda: len(rb.models) == 2, timeout=15, what="the model, one datagram per call")
        assert bytes(rb.models[1].payload) == second
        assert plain.calls == 1 and not endpoint._segmenting  # asked once, then never again

    run_cluster("ipv8", tmp_path, body)


def test_the_datagrams_queued_behind_a_transfers_are_read_in_one_turn_and_others_go_to_ipv8():
    async def run() -> None:
        seal = DatagramSeal(bytes(range(32)))
        endpoint = GuardedUDPEndpoint("127.0.0.1", 0, DestinationGuard("127.0.0.1"), seal)
        await endpoint.open()
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        source = sender.getsockname()
        keys, _ = _keys()
        size = 10 * udpwire.CHUNK
        r = Receiving(b"t" * 8, source, size, Ephemeral(), b"", _NoWire())
        r.keys = keys  # as agreed by a START
        receiver = UdpReceiver(_NoWire(), 1.0, 1, 4)
        receiver.active[r.tid], receiver.keyed[source] = r, [r]
        endpoint.on_chunk = lambda addr, datagram: receiver.take(addr, datagram)
        controls: list[bytes] = []
        endpoint.on_transfer = lambda addr, packet: controls.append(packet)
        to_ipv8: list[bytes] = []
        endpoint.notify_listeners = lambda packet: to_ipv8.append(packet[1])  # type: ignore[method-assign]
        turns = 0
        take = endpoint.datagram_received

        def counted(datagram: bytes, addr: tuple[str, int]) -> None:  # what asyncio calls, once per turn of the loop
            nonlocal turns
            turns += 1
            take(datagram, addr)

        endpoint.datagram_received = counted  # type: ignore[method-assign]
        payload = os.urandom(size)
        try:
            for seq in range(10):  # sealed under the transfer's key only, as a sender sends them
                sender.sendto(keys.data(seq, payload[seq * udpwire.CHUNK:(seq + 1) * udpwire.CHUNK]), endpoint.get_address())
            await wait_until(lambda: r.got == 10, timeout=5, what="the chunks")
            assert turns == 1 and bytes(r.buf) == payload  # read in one turn, decrypted into place
            # From the transfer's own address, but not its chunks: on to the swarm seal, then IPv8 or the UDP way
            sender.sendto(seal.seal(b"\x00\x02an IPv8 packet"), endpoint.get_address())
            await wait_until(lambda: to_ipv8 == [b"\x00\x02an IPv8 packet"], timeout=5, what="the IPv8 packet")
            start = udpwire.start(b"t" * 8, bytes(32))
            sender.sendto(seal.seal(start), endpoint.get_address())
            await wait_until(lambda: controls == [start], timeout=5, what="the control datagram")
            assert r.got == 10 and len(to_ipv8) == 1
        finally:
            sender.close()
            endpoint.close()
            r.close()
            await asyncio.sleep(0)

    asyncio.run(run())


class _NoWire:
    def send(self, address: tuple[str, int], packet: bytes) -> None:
        pass

    def send_sealed(self, address: tuple[str, int], datagrams: list[bytes]) -> None:
        pass

    def queued(self) -> int:
        return 0


def _keys() -> tuple[udpwire.TransferKeys, udpwire.TransferKeys]:
    mine, theirs = Ephemeral(), Ephemeral()
    return (udpwire.TransferKeys.derive(mine, theirs.public, b"ctx", b"t" * 8),
            udpwire.TransferKeys.derive(theirs, mine.public, b"ctx", b"t" * 8))
