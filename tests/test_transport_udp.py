"""The UDP way wired into the IPv8 transport, on loopback: when no TCP way connects, a model comes over the UDP
sockets the peers already talk on, is logged ``transfer path=udp``, and the way is remembered for that sender.

Loopback has no NAT, so the transport offers only ``direct`` there: the test closes the sender's TCP port and lets
the recipient consider UDP as it does off loopback. The NAT lab runs the real case (`test_natlab_e2e.py`)."""

from __future__ import annotations

import logging
import os
import time

from quinkgl_cli.transport.base import TransferDone
from quinkgl_cli.transport.ipv8.paths import UDP, Route
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
