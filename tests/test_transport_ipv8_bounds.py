"""Resource bounds of the IPv8 transport that no number of connections, offers or identities can break.

Each test plays one attack from issue 12 on loopback, in one process, and checks the bound holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time

from quinkgl_cli.transport.ipv8 import stream
from quinkgl_cli.transport.ipv8.payloads import HelloPayload, OfferPayload
from quinkgl_cli.transport.ipv8.settings import Limits, StrangerLimits
from tests.test_transport_contract import Cluster, _upd, run_cluster, wait_until


def _fetch_tasks(sender: str) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"quinkgl-fetch-{sender}" and not t.done()]


def _flood_offers(sender, recipient, count: int, size: int = 1000) -> None:
    """Signed offers from ``sender`` the way a hostile member would send them: fresh ids, nothing behind them."""
    parts = sender.parts
    recipient_mid = hashlib.sha1(recipient.parts.key.pub().key_to_bin()).digest()
    for _ in range(count):
        parts.courier.send(recipient.address, OfferPayload(
            sender.swarm_id, *parts.courier.stamp(), os.urandom(stream.OFFER_ID_BYTES), 1, sender.node_id,
            recipient.node_id, recipient_mid, size, os.urandom(32), "qgl-tensors/1", 1, b"{}", sender.tcp_port))


def test_an_offer_flood_queues_a_bounded_number_of_fetches(tmp_path, caplog):
    """Issue 12 item 3: one member's offers must not queue fetches without bound behind the fetch slots."""
    limits = Limits(fetch_queue_per_peer=4, fetch_queue_total=6, offer_burst=1000, offers_per_second=1000.0)

    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, _ = await c.add("b", limits=limits)
        m, _ = await c.add("m")
        await c.meet(["a", "b", "m"])
        b.parts.fetcher.slots = asyncio.Semaphore(0)  # b is busy: every accepted fetch waits in the queue
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            _flood_offers(m, b, 50)
            await wait_until(lambda: b.stats.dropped >= 46, what="the flood refused")
            _flood_offers(a, b, 10)
            await wait_until(lambda: b.stats.dropped >= 46 + 8, what="the second sender refused beyond the total")
        assert len(_fetch_tasks("m")) == 4 and len(_fetch_tasks("a")) == 2
        refused = [r for r in caplog.records if "reason=queue_full" in r.getMessage()]
        assert sorted(r.qgl_fields["peer"] for r in refused) == ["a", "m"]  # logged once per sender

    run_cluster("ipv8", tmp_path, body)


def test_offers_beyond_a_senders_rate_are_ignored(tmp_path, caplog):
    """Issue 12 item 3: per-sender offer rate limit."""
    limits = Limits(offer_burst=5, offers_per_second=1.0, fetch_queue_per_peer=1000, fetch_queue_total=1000)

    async def body(c: Cluster):
        b, _ = await c.add("b", limits=limits)
        m, _ = await c.add("m")
        await c.meet(["b", "m"])
        b.parts.fetcher.slots = asyncio.Semaphore(0)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            _flood_offers(m, b, 100)
            await wait_until(lambda: b.stats.dropped + len(_fetch_tasks("m")) >= 100, what="every offer handled")
        allowed = 5 + int(time.monotonic() - started) + 1
        assert 5 <= len(_fetch_tasks("m")) <= allowed
        assert any("reason=rate_limited" in r.getMessage() for r in caplog.records)

    run_cluster("ipv8", tmp_path, body)


def test_idle_connections_cannot_hold_the_serve_slots(tmp_path):
    """Issue 12 item 4: unauthenticated TCP connections, however many, hold no serve slot and do not keep the
    real recipient from fetching. (Before: 16 idle connections held all 16 slots for the whole request timeout.)"""

    async def body(c: Cluster):
        a, _ = await c.add("a", connect_timeout=30.0)  # a patient server: idle connections stay as long as allowed
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        loop = asyncio.get_running_loop()
        idle = []
        try:
            for _ in range(Limits().pending_handshakes + 16):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", a.tcp_port))
                idle.append(sock)
            await wait_until(lambda: len(a.parts.server.pending) == Limits().pending_handshakes, what="the handshakes queued")
            a.send_model("b", _upd(round_=1, payload=b"through the crowd" * 100))
            await wait_until(lambda: rb.models, timeout=5, what="the recipient's fetch")
            assert a.parts.server.slots._value == Limits().serve_slots  # nothing held once served
        finally:
            for sock in idle:
                sock.close()

    run_cluster("ipv8", tmp_path, body)


def test_a_stalling_sender_cannot_starve_the_fetch_slots(tmp_path, caplog):
    """Issue 12 item 5: a sender that trickles a byte now and then, never idle for long, holds at most one of our
    fetch slots and is abandoned within the stall window; another sender's model goes through meanwhile."""

    async def body(c: Cluster):
        b, rb = await c.add("b", max_concurrent_fetches=2)
        slow, _ = await c.add("slow")
        ok, _ = await c.add("ok")
        await c.meet(["b", "slow", "ok"])

        async def trickle(loop, conn, out, sealer):
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.OK, out.size))
            sealed = b"".join(sealer.frames(out.payload))
            for i in range(len(sealed)):
                await loop.sock_sendall(conn, sealed[i : i + 1])
                await asyncio.sleep(0.3)

        slow.parts.server._send = trickle
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            for r in (1, 2, 3):
                slow.send_model("b", _upd(round_=r, payload=os.urandom(5000)))
            await wait_until(lambda: len(_fetch_tasks("slow")) == 3, what="the slow offers accepted")
            # Before the fix both slots stayed with the slow sender for its whole deadline (about 6 s here).
            ok.send_model("b", _upd(round_=1, payload=b"on time"))
            await wait_until(lambda: rb.models, timeout=5, what="the other sender's model")
            assert rb.models[0].sender == "ok"
            await wait_until(lambda: "fetch-failed peer=slow reason=stalled" in caplog.text, timeout=30,
                             what="the stalled download abandoned")

    run_cluster("ipv8", tmp_path, body)


def test_a_full_peer_table_makes_room_for_a_late_honest_peer(tmp_path, caplog):
    """Issue 12 item 6: identities that proved nothing fill the table first; a late peer still gets in (an
    unproven entry past its grace gives way) and, once it has delivered a model, stays while they churn."""
    limits = Limits(strangers=StrangerLimits(grace=1.0))

    async def body(c: Cluster):
        a, ra = await c.add("a", max_peers=3, limits=limits)
        for name in ("s1", "s2", "s3"):
            await c.add(name)
        await c.meet(["a", "s1", "s2", "s3"])
        await asyncio.sleep(limits.strangers.grace)  # the fillers have had their chance to prove something
        h, rh = await c.add("h")
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            await wait_until(lambda: "h" in {p.node_id for p in a.peers()} and "a" in {p.node_id for p in h.peers()},
                             timeout=10, what="the late peer admitted")
        assert len(ra.lost) >= 1 and set(ra.lost) <= {"s1", "s2", "s3"}
        h.send_model("a", _upd(round_=1, payload=b"a real update"))
        await wait_until(lambda: any(m.sender == "h" for m in ra.models), what="the late peer's model")
        lost_before = len(ra.lost)
        await wait_until(lambda: len(ra.lost) >= lost_before + 2, timeout=15, what="the fillers to churn")
        assert "h" in {p.node_id for p in a.peers()} and "h" not in ra.lost  # a proven peer is never the one to go
        assert len(a.peers()) == 3

    run_cluster("ipv8", tmp_path, body)


def test_a_peer_that_never_fetches_gets_only_its_probation_offers(tmp_path, caplog):
    """Issue 12 item 6: we stop offering to a peer that never proved anything (it left every offer unfetched)."""
    limits = Limits(strangers=StrangerLimits(probation_offers=3), pending_offers_per_peer=2)

    async def body(c: Cluster):
        a, _ = await c.add("a", limits=limits)
        sink, _ = await c.add("sink")
        h, rh = await c.add("h")
        await c.meet(["a", "sink", "h"])
        sink.parts.fetcher.on_offer = lambda rec, p: None  # takes offers, never fetches them
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            for r in range(1, 7):
                a.send_model("sink", _upd(round_=r))
                a.send_model("h", _upd(round_=r, payload=bytes([r]) * 100))
                await wait_until(lambda r=r: len(rh.models) == r, what=f"h's model {r}")
        # offers 1-3 were pushed out unfetched by offers 3-5 (two wait at a time); offer 6 is not made
        assert len([o for o in a.parts.outbox.offers.values() if o.recipient == "sink"]) == 2
        assert len(rh.models) == 6
        assert [r.getMessage() for r in caplog.records if "reason=unproven" in r.getMessage()] == [
            "send-failed peer=sink reason=unproven unanswered=3"]

    run_cluster("ipv8", tmp_path, body)


def test_a_crowded_ipv8_peer_list_still_answers_a_newcomer(tmp_path):
    """Issue 12 item 6, one layer down: IPv8 ignores introduction requests once its own peer list is full, and keys
    we refused stay on it. A newcomer must still be answered: the strangers make room."""

    async def body(c: Cluster):
        a, _ = await c.add("a", max_peers=2, limits=Limits(strangers=StrangerLimits(grace=60.0)))  # nobody may be evicted in this test
        await c.add("s1")
        await c.add("s2")
        await c.meet(["a", "s1", "s2"])
        await c.add("s3")  # refused by a (peer_limit), yet on IPv8's list
        await wait_until(lambda: len(a.parts.community.get_peers()) > 2, what="a's IPv8 list over its bound")
        h, _ = await c.add("h")
        await wait_until(lambda: a.address in {tuple(p.address) for p in h.parts.community.get_peers()},
                         what="the newcomer's introduction answered")

    run_cluster("ipv8", tmp_path, body)


def test_one_recipient_holds_at_most_its_share_of_the_serve_slots(tmp_path):
    """Issue 12 item 4: a known peer that opens many authenticated fetches at once (and reads none of them) holds
    ``serve_slots_per_peer`` slots; its further requests are answered busy."""
    from ipv8.keyvault.crypto import default_eccrypto

    async def request(owner, offer_id, signer_key):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stream.tune(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read: the server's send blocks
        await loop.sock_connect(sock, ("127.0.0.1", owner.tcp_port))
        _, _, nonce, theirs = stream.CHALLENGE.unpack(await stream.recv_exact(loop, sock, stream.CHALLENGE.size, 3))
        ours = os.urandom(32)  # never used to decrypt: this client reads nothing
        statement = stream.fetch_statement(owner.community_id, offer_id, nonce, owner.parts.key.pub().key_to_bin(), theirs, ours)
        sig = default_eccrypto.create_signature(signer_key, statement)
        await loop.sock_sendall(sock, stream.REQUEST_HEAD.pack(stream.REQUEST_MAGIC, offer_id, ours, len(sig)) + sig)
        status, _ = stream.RESPONSE.unpack(await stream.recv_exact(loop, sock, stream.RESPONSE.size, 3))
        return sock, status

    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, _ = await c.add("b")
        await c.meet(["a", "b"])
        b.parts.fetcher.slots = asyncio.Semaphore(0)  # b's own fetches wait: its offers stay unfetched at a
        for r in (1, 2, 3):  # one at a time: hashed in threads, offers sent together may go out of round order
            a.send_model("b", _upd(round_=r, payload=os.urandom(8_000_000)))
            await wait_until(lambda r=r: len(a.parts.outbox.offers) == r, timeout=20, what=f"offer {r} to b")
        socks = []
        try:
            statuses = []
            for offer_id in list(a.parts.outbox.offers):
                sock, status = await request(a, offer_id, b.parts.key)
                socks.append(sock)
                statuses.append(status)
            assert statuses == [stream.OK, stream.OK, stream.BUSY]
            assert a.parts.server.serving == {"b": Limits().serve_slots_per_peer}
        finally:
            for sock in socks:
                sock.close()

    run_cluster("ipv8", tmp_path, body)


def test_a_seed_gets_into_a_table_full_of_fresh_keys_and_only_it_counts_as_trusted(tmp_path):
    """Issue 12 item 6: fresh keys fill the table first, all within their grace; a late peer at an address we were
    told to seek (a bootstrap peer) still gets in at once, both ways, and only it is trusted (`--min-peers`)."""
    from quinkgl_cli.node.localswarm import free_port
    from quinkgl_cli.transport.ipv8 import IPv8Transport
    from tests.test_transport_contract import Recorder

    late_port = free_port()

    async def body(c: Cluster):
        a, ra = await c.add("a", max_peers=4, limits=Limits(strangers=StrangerLimits(grace=60.0, free=2)))
        a.parts.membership.seeds.append(("127.0.0.1", late_port))  # as if started with --bootstrap-peer
        for i in range(6):
            await c.add(f"s{i}")
        await wait_until(lambda: len(a.peers()) == 4, what="the table full of fresh keys")
        assert not any(p.trusted for p in a.peers())  # more strangers than StrangerLimits.free: none counts
        h = IPv8Transport(node_id="h", swarm_id=a.swarm_id, arch_hash=a.arch_hash, state_dir=tmp_path / "h",
                          port=late_port, bootstrap=[a.address], walk_interval=0.2, silence_timeout=3.0)
        rh = Recorder()
        await h.start(rh)
        try:
            await wait_until(lambda: a.knows("h") and h.knows("a"), timeout=10, what="the seed admitted both ways")
            trusted = {p.node_id for p in a.peers() if p.trusted}
            assert trusted == {"h"} and len(a.peers()) == 4
            assert {p.node_id for p in h.peers() if p.trusted} == {"a"}
            a.send_model("h", _upd(round_=1, payload=b"to the seed"))
            await wait_until(lambda: rh.models, what="its model")
        finally:
            await h.stop()

    run_cluster("ipv8", tmp_path, body)


def test_untrusted_peers_packets_are_budgeted_before_their_signatures_are_checked(tmp_path, caplog):
    """Issue 12 items 3 and 6: a peer that proved nothing gets a packet budget, checked before the signature (a
    flood costs a lookup per packet); a peer that delivered a model has none."""
    limits = Limits(strangers=StrangerLimits(packets_per_peer=5.0))

    async def body(c: Cluster):
        a, ra = await c.add("a", limits=limits)
        m, _ = await c.add("m")
        h, _ = await c.add("h")
        await c.meet(["a", "m", "h"])
        h.send_model("a", _upd(round_=1))
        await wait_until(lambda: ra.models, what="h's model: h is trusted now")
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            for i in range(150):
                m.send_message("a", "flood", {"i": i})
                h.send_message("a", "work", {"i": i})
                if i % 25 == 0:
                    await asyncio.sleep(0.01)  # both senders' datagrams fit the receive buffer
            await wait_until(lambda: sum(s == "h" for s, _, _ in ra.messages) == 150, what="all of h's messages")
        from_m = sum(s == "m" for s, _, _ in ra.messages)
        assert 0 < from_m <= 40, from_m  # a burst of 10, then 5 a second
        assert "packet-refused peer=m reason=rate_limited sender=untrusted" in caplog.text

    run_cluster("ipv8", tmp_path, body)


def test_datagrams_cost_no_scan_of_ipv8s_peer_list(tmp_path):
    """IPv8 marked a datagram's sender alive by looking its address up among all its peers, a scan for an address it
    does not know (~90 us with 256 peers), before the packet gate: a flood of fresh keys paid it per datagram. The
    sender is now found by the key that signed a handled packet."""

    async def body(c: Cluster):
        a, ra = await c.add("a")
        h, _ = await c.add("h")
        await c.meet(["a", "h"])
        h.send_model("a", _upd(round_=1))
        await wait_until(lambda: ra.models, what="h's model: h is trusted now, its datagrams unbudgeted")
        network = a.parts.community.network
        scans = []
        scan = network.get_verified_by_address
        network.get_verified_by_address = lambda address: scans.append(address) or scan(address)
        for i in range(100):
            h.send_message("a", "work", {"i": i})
            if i % 25 == 0:
                await asyncio.sleep(0.01)
        await wait_until(lambda: sum(s == "h" for s, _, _ in ra.messages) == 100, what="all of h's messages")
        assert len(scans) < 10, len(scans)  # IPv8's own introduction handling may still look one up
        peer = network.get_verified_by_public_key_bin(h.parts.key.pub().key_to_bin())
        assert peer is not None and time.time() - peer.last_response < 5.0

    run_cluster("ipv8", tmp_path, body)


def test_puncture_requests_cannot_aim_a_stream_of_datagrams_at_a_third_party(tmp_path):
    """A puncture request names any address and is not signed; IPv8 sends a puncture there at once. A member (or
    anyone holding the swarm key) could aim a node's datagrams at another service: 166 of 400 requests reached the
    chosen port of a real daemon's host in 12 s. One puncture per target per `punctures.GAP_S`, a few a second in all."""

    async def body(c: Cluster):
        a, _ = await c.add("a")
        m, _ = await c.add("m")
        await c.meet(["a", "m"])
        victims = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        for v in victims:
            v.bind(("127.0.0.1", 0))
            v.setblocking(False)
        community, endpoint = m.parts.community, m.parts.endpoint
        for i in range(60):  # 20 to each of the three, as fast as a member may send them
            target = victims[i % 3].getsockname()
            endpoint.send(a.address, community.create_puncture_request(target, target, i))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        got = []
        for v in victims:
            n = 0
            while True:
                try:
                    v.recvfrom(65536)
                except BlockingIOError:
                    break
                n += 1
            got.append(n)
            v.close()
        assert got == [1, 1, 1], got  # the first puncture to each (a real introducer's) still goes out

    run_cluster("ipv8", tmp_path, body)


def test_a_key_coming_back_at_every_hello_is_not_lost_and_met_again_each_time(tmp_path):
    """One member key saying hello under a new node id (or a new session) each time: every hello lost its entry and
    discovered a new one. Against a real daemon, 3,400 such hellos in 40 s made 6,800 INFO lines and grew its
    checkpoint (the names it met) by 190 KB; a new session each time, 3,400 peer-lost lines. A key joins the table
    at most `StrangerLimits.joins_per_key` times in `joins_window` seconds."""

    async def body(c: Cluster):
        a, seen = await c.add("a")
        m, _ = await c.add("m")
        await c.meet(["a", "m"])
        membership, courier = m.parts.membership, m.parts.courier
        s = membership.settings
        for i in range(40):
            renamed = i % 2 == 0  # every other hello a new name, the others a new session
            session, counter = courier.stamp()
            courier.send(a.address, HelloPayload(s.swarm_id, f"m-{i}" if renamed else "m", s.arch_hash,
                                                 s.protocol_version, session + (0 if renamed else i + 1), counter,
                                                 membership.tcp_port, False, b""))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        limit = 3  # the default `StrangerLimits.joins_per_key`
        assert len(seen.discovered) <= limit and len(seen.lost) <= limit - 1, (seen.discovered, seen.lost)

    run_cluster("ipv8", tmp_path, body)
