"""The behaviour every transport promises the node, run against each implementation.

The IPv8 transport runs in-process on 127.0.0.1 ephemeral ports; the memory transport on one hub.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.base import OutgoingUpdate, Transport
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

KINDS = ["memory", "ipv8"]


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


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Cluster:
    def __init__(self, kind: str, tmp_path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.net = MemoryNetwork()
        self.nodes: dict[str, tuple[Transport, Recorder]] = {}
        self.seed: tuple[str, int] | None = None

    async def add(self, name: str, swarm: str = "sha256:" + "ab" * 32, arch: str = "sha256:" + "cd" * 32, max_model_bytes: int = 64 * 1024 * 1024,
                  **ipv8_options):
        rec = Recorder()
        if self.kind == "memory":
            t: Transport = MemoryTransport(self.net, name, swarm_id=swarm, arch_hash=arch, max_model_bytes=max_model_bytes)
        else:
            from quinkgl_cli.transport.ipv8 import IPv8Transport

            t = IPv8Transport(
                node_id=name,
                swarm_id=swarm,
                arch_hash=arch,
                state_dir=self.tmp_path / name,
                listen_host="127.0.0.1",
                port=0,
                bootstrap=[self.seed] if self.seed else [],
                max_model_bytes=max_model_bytes,
                walk_interval=0.2,
                silence_timeout=3.0,
                fetch_timeout=3.0,
                **ipv8_options,
            )
        await t.start(rec)
        if self.kind == "ipv8" and self.seed is None:
            self.seed = t.address
        self.nodes[name] = (t, rec)
        return t, rec

    async def meet(self, names: list[str], timeout: float = 10.0) -> None:
        def done() -> bool:
            return all(
                {p.node_id for p in self.nodes[n][0].peers()} >= set(names) - {n} for n in names
            )

        await wait_until(done, timeout, f"{names} to meet")

    async def close(self) -> None:
        for t, _ in self.nodes.values():
            await t.stop()


def run_cluster(kind, tmp_path, body):
    async def main():
        cluster = Cluster(kind, tmp_path)
        try:
            await asyncio.wait_for(body(cluster), 30)
        finally:
            await cluster.close()

    asyncio.run(main())


def _upd(round_=1, payload=b"\x01\x02" * 50, sample_count=10, **kw):
    return OutgoingUpdate(round=round_, payload=payload, sample_count=sample_count, **kw)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def test_three_peers_discover_each_other(kind, tmp_path):
    async def body(c: Cluster):
        for n in ("a", "b", "c"):
            await c.add(n)
        await c.meet(["a", "b", "c"])
        t, rec = c.nodes["a"]
        assert sorted(rec.discovered) == ["b", "c"]
        for p in t.peers():
            assert len(p.public_key) >= 64 and int(p.public_key, 16) >= 0
            assert p.last_seen > 0
            assert p.address is None or p.address[0] == "127.0.0.1"

    run_cluster(kind, tmp_path, body)


def test_model_arrives_intact_with_its_offer(kind, tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        a.send_model("b", _upd(round_=7, payload=payload, sample_count=123, encoding="qgl-sparse/1", meta={"k": "v", "n": 2}))
        assert rb.models == []  # send_model only queues
        await wait_until(lambda: rb.models, what="model")
        (m,) = rb.models
        assert (m.sender, m.round, m.sample_count, m.encoding, m.meta) == ("a", 7, 123, "qgl-sparse/1", {"k": "v", "n": 2})
        assert bytes(m.payload) == payload
        assert b.stats.models_received == 1 and b.stats.bytes_received == len(payload)
        await wait_until(lambda: a.stats.models_sent == 1, what="sender stats")
        assert a.stats.bytes_sent == len(payload)

    run_cluster(kind, tmp_path, body)


def test_send_model_does_not_block(kind, tmp_path):
    payload = b"\0" * (8 * 1024 * 1024)

    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        start = time.perf_counter()
        for r in range(3):
            a.send_model("b", _upd(round_=r, payload=payload))
        assert time.perf_counter() - start < 0.5
        await wait_until(lambda: len(rb.models) == 3, what="three models")

    run_cluster(kind, tmp_path, body)


def test_send_to_unknown_peer_is_counted_not_raised(kind, tmp_path, caplog):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a.send_model("nobody", _upd())
            a.send_model("nobody", _upd())
            a.send_message("nobody", "ping", {})
        assert a.stats.dropped == 3
        assert caplog.text.count("reason=unknown_peer") == 2  # once per event kind, not per call

    run_cluster(kind, tmp_path, body)


def test_oversized_offer_is_refused_and_logged_once(kind, tmp_path, caplog):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b", max_model_bytes=1000)
        await c.meet(["a", "b"])
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            for r in range(3):
                a.send_model("b", _upd(round_=r, payload=b"\0" * 1001))
            a.send_model("b", _upd(round_=5, payload=b"\0" * 1000))
            await wait_until(lambda: rb.models, what="the model under the limit")
        assert [m.round for m in rb.models] == [5]
        assert b.stats.dropped == 3
        assert caplog.text.count("offer-refused peer=a reason=oversized") == 1

    run_cluster(kind, tmp_path, body)


def test_out_of_date_offer_is_ignored(kind, tmp_path):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        a.send_model("b", _upd(round_=5, payload=b"five"))
        await wait_until(lambda: rb.models, what="round 5")
        a.send_model("b", _upd(round_=3, payload=b"three"))
        a.send_model("b", _upd(round_=5, payload=b"five again"))  # same round, new content: a second gossip step
        await wait_until(lambda: len(rb.models) == 2, what="second round-5 update")
        a.send_model("b", _upd(round_=6, payload=b"six"))
        await wait_until(lambda: len(rb.models) == 3, what="round 6")
        assert [bytes(m.payload) for m in rb.models] == [b"five", b"five again", b"six"]

    run_cluster(kind, tmp_path, body)


def test_control_messages(kind, tmp_path):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        a.send_message("b", "fingerprint", {"round": 3, "mean": 0.25, "ok": True, "tag": None, "vec": [1.0, 2.0]})
        await wait_until(lambda: rb.messages, what="message")
        assert rb.messages == [("a", "fingerprint", {"round": 3, "mean": 0.25, "ok": True, "tag": None, "vec": [1.0, 2.0]})]
        with pytest.raises(NetworkError, match="kind"):
            a.send_message("b", "bad kind!", {})
        with pytest.raises(NetworkError, match="limit"):
            a.send_message("b", "big", {"x": "y" * 40000})
        with pytest.raises(NetworkError, match="JSON"):
            a.send_message("b", "nan", {"x": float("nan")})

    run_cluster(kind, tmp_path, body)


def test_architecture_mismatch_is_refused_and_logged_once(kind, tmp_path, caplog):
    async def body(c: Cluster):
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a, ra = await c.add("a")
            b, rb = await c.add("b", arch="sha256:" + "ee" * 32)
            await c.add("c")
            await c.meet(["a", "c"])
            await wait_until(lambda: "arch_mismatch" in caplog.text, what="mismatch log")
            await asyncio.sleep(0.5 if c.kind == "ipv8" else 0)  # several walks: still one line per peer
        assert "b" not in ra.discovered and rb.discovered == []
        assert not b.peers()
        lines = [r.getMessage() for r in caplog.records
                 if "arch_mismatch" in r.getMessage() and "peer=b" in r.getMessage() and getattr(r, "node", None) == "a"]
        assert len(lines) == 1, lines

    run_cluster(kind, tmp_path, body)


def test_other_swarm_never_meets_or_delivers(kind, tmp_path):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        x, rx = await c.add("x", swarm="sha256:" + "99" * 32)
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        x.send_model("a", _upd())
        x.send_message("a", "ping", {})
        a.send_model("b", _upd())
        await wait_until(lambda: rb.models, what="in-swarm model")
        assert not x.peers() and rx.discovered == []
        assert "x" not in ra.discovered and ra.models == [] and ra.messages == []

    run_cluster(kind, tmp_path, body)


def test_stopped_peer_is_reported_lost(kind, tmp_path, caplog):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            await b.stop()
            await wait_until(lambda: ra.lost == ["b"], what="peer lost")
        assert a.peers() == []
        a.send_model("b", _upd())
        assert a.stats.dropped == 1
        # The node reports the loss to the operator (INFO); the transport's own line is for debugging only.
        lost = [r for r in caplog.records if r.getMessage().startswith("peer-lost ") and getattr(r, "node", None) == "a"]
        assert lost and all(r.levelno == logging.DEBUG for r in lost)

    run_cluster(kind, tmp_path, body)


# -- IPv8-only properties (identity, binding, guard, hostile input) ----------------------------------------------------
import os  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402

from quinkgl_cli.errors import CryptoError  # noqa: E402


def _ipv8(tmp_path, name, **kw):
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    kw.setdefault("swarm_id", "sha256:" + "ab" * 32)
    kw.setdefault("arch_hash", "sha256:" + "cd" * 32)
    kw.setdefault("walk_interval", 0.2)
    return IPv8Transport(node_id=name, state_dir=tmp_path / name, **kw)


def test_ipv8_identity_is_private_and_survives_restart(tmp_path):
    async def main():
        t = _ipv8(tmp_path, "a")
        await t.start(Recorder())
        first = t.public_key
        await t.stop()
        key_file = tmp_path / "a" / "transport_key.bin"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
        again = _ipv8(tmp_path, "a")
        await again.start(Recorder())
        assert again.public_key == first
        await again.stop()
        # The same node in another swarm shows another key (its memberships cannot be linked by key), and the same
        # one again at its next start there.
        elsewhere = []
        for _ in range(2):
            other = _ipv8(tmp_path, "a", swarm_id="sha256:" + "ef" * 32)
            await other.start(Recorder())
            elsewhere.append(other.public_key)
            await other.stop()
        assert elsewhere[0] == elsewhere[1] not in ("", first)
        os.chmod(key_file, 0o644)
        with pytest.raises(CryptoError, match="readable by others"):
            await _ipv8(tmp_path, "a").start(Recorder())

    asyncio.run(main())


def test_ipv8_taken_port_is_an_error_not_a_silent_move(tmp_path):
    async def main():
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        try:
            with pytest.raises(NetworkError, match=f"cannot bind UDP 127.0.0.1:{port}"):
                await _ipv8(tmp_path, "a", port=port).start(Recorder())
        finally:
            busy.close()
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        port = tcp.getsockname()[1]
        try:
            with pytest.raises(NetworkError, match=f"cannot bind TCP 127.0.0.1:{port}"):
                await _ipv8(tmp_path, "b", port=port).start(Recorder())
        finally:
            tcp.close()
        t = _ipv8(tmp_path, "c", port=port)
        await t.start(Recorder())
        assert t.address == ("127.0.0.1", port) and t.tcp_port == port
        await t.stop()

    asyncio.run(main())


def test_ipv8_refuses_off_loopback_configuration(tmp_path):
    with pytest.raises(NetworkError, match="not on loopback"):
        _ipv8(tmp_path, "a", bootstrap=["192.168.1.5:7001"])
    with pytest.raises(NetworkError, match="non-loopback listen address"):
        _ipv8(tmp_path, "a", enable_lan_discovery=True)
    with pytest.raises(NetworkError, match="non-loopback listen address"):
        _ipv8(tmp_path, "a", enable_public_bootstrap=True)
    with pytest.raises(NetworkError, match="(?i)not host:port"):
        _ipv8(tmp_path, "a", bootstrap=["127.0.0.1"])
    with pytest.raises(NetworkError, match="not an IP address"):
        _ipv8(tmp_path, "a", listen_host="ip6-localhost")


def test_ipv8_community_id_comes_from_the_swarm_key(tmp_path):
    from quinkgl_cli.manifest import swarmkey
    from quinkgl_cli.transport.admission import AdmissionSettings
    from quinkgl_cli.transport.ipv8.community import community_id_for

    async def main():
        a = _ipv8(tmp_path, "a", swarm_id="sha256:" + "11" * 32)
        b = _ipv8(tmp_path, "b", swarm_id="sha256:" + "22" * 32,
                  admission=AdmissionSettings("sha256:" + "22" * 32, None, swarm_key=b"k" * 32))
        await a.start(Recorder())
        await b.start(Recorder())
        try:
            assert a.community_id == community_id_for(swarmkey.for_swarm_id("sha256:" + "11" * 32))
            assert b.community_id == community_id_for(b"k" * 32)
            assert a.community_id != b.community_id
            assert a.parts.community.get_prefix()[2:] == a.community_id
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_ipv8_guard_drops_non_loopback_datagrams(tmp_path, monkeypatch):
    sent: list = []
    original = socket.socket.sendto

    def spy(sock, data, *args):
        sent.append(args[-1])
        return original(sock, data, *args)

    async def main():
        t = _ipv8(tmp_path, "a")
        await t.start(Recorder())
        monkeypatch.setattr(socket.socket, "sendto", spy)
        try:
            t.parts.endpoint.send(("10.0.0.7", 7001), b"x")
            t.parts.endpoint.send(("example.org", 7001), b"x")
            t.parts.community.walk_to(("192.168.0.9", 7001))
            t.parts.endpoint.send(("127.0.0.1", t.address[1]), b"to myself")
            await asyncio.sleep(0)
        finally:
            monkeypatch.undo()
            await t.stop()
        assert t.guard.blocked == 3
        assert [a[0] for a in sent] == ["127.0.0.1"]

    asyncio.run(main())


def test_ipv8_malformed_packets_are_logged_once_and_ignored(tmp_path, caplog):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        prefix = a.parts.community.get_prefix()
        seal = a.parts.endpoint.seal  # junk from a holder of the swarm key, which gets past the seal
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.bind(("127.0.0.1", 0))
        try:
            with caplog.at_level(logging.DEBUG):
                for msg_id in (1, 2, 3, 4, 5, 99):
                    for _ in range(3):
                        junk.sendto(seal.seal(prefix + bytes([msg_id]) + os.urandom(40)), a.address)
                junk.sendto(seal.seal(b"not ipv8 at all"), a.address)
                junk.sendto(prefix + bytes([1]) + os.urandom(40), a.address)  # cleartext: an older version's
                junk.sendto(b"not sealed at all", a.address)
                await wait_until(lambda: a.stats.dropped >= 21, what="junk to be counted")
        finally:
            junk.close()
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("packet-refused") and r.levelno >= logging.WARNING]
        reasons = sorted(m.split("reason=")[1].split()[0] for m in refused)
        # once per (source, reason)
        assert reasons == ["cleartext", "malformed", "other_community", "other_swarm", "unknown_message"], refused
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        a.send_model("b", _upd(round_=1))
        await wait_until(lambda: rb.models, what="model after junk")

    run_cluster("ipv8", tmp_path, body)


def test_ipv8_only_the_recipient_can_fetch(tmp_path, caplog):
    from ipv8.keyvault.crypto import default_eccrypto

    from quinkgl_cli.transport.ipv8 import stream

    async def steal(thief, owner, offer_id, signer_key, nonce_override=None):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stream.tune(sock)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", owner.tcp_port))
            _, _, nonce, theirs = stream.CHALLENGE.unpack(await stream.recv_exact(loop, sock, stream.CHALLENGE.size, 3))
            ours = os.urandom(32)
            statement = stream.fetch_statement(owner.community_id, offer_id, nonce_override or nonce, owner.parts.key.pub().key_to_bin(),
                                               theirs, ours)
            sig = default_eccrypto.create_signature(signer_key, statement)
            await loop.sock_sendall(sock, stream.REQUEST_HEAD.pack(stream.REQUEST_MAGIC, offer_id, ours, len(sig)) + sig)
            status, size = stream.RESPONSE.unpack(await stream.recv_exact(loop, sock, stream.RESPONSE.size, 3))
            return status, size
        finally:
            sock.close()

    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        thief, _ = await c.add("c")
        await c.meet(["a", "b", "c"])
        gate = asyncio.Semaphore(0)
        b.parts.fetcher.slots = gate  # b is busy: the offer waits, unfetched, while the thief tries
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a.send_model("b", _upd(round_=1, payload=b"secret weights" * 1000))
            await wait_until(lambda: a.parts.outbox.offers, what="offer registered")
            (offer_id,) = list(a.parts.outbox.offers)
            assert await steal(thief, a, offer_id, thief.parts.key) == (stream.NOT_RECIPIENT, 0)
            # a signature by the real recipient, but over another connection's challenge, is useless too
            assert await steal(thief, a, offer_id, b.parts.key, nonce_override=b"\0" * 32) == (stream.NOT_RECIPIENT, 0)
            assert await steal(thief, a, os.urandom(20), thief.parts.key) == (stream.UNKNOWN_OFFER, 0)
        assert caplog.text.count("reason=not_recipient") == 1
        assert rb.models == []
        gate.release()
        await wait_until(lambda: rb.models, what="the recipient's own fetch")
        assert bytes(rb.models[0].payload) == b"secret weights" * 1000

    run_cluster("ipv8", tmp_path, body)


def test_ipv8_crashed_and_restarted_peer_is_seen_anew(tmp_path):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        b.send_model("a", _upd(round_=9, payload=b"late round"))
        await wait_until(lambda: ra.models, what="round 9")
        b.running = False  # a crash: no goodbye
        await b._teardown()
        again = _ipv8(tmp_path, "b", bootstrap=[a.address], silence_timeout=3.0)
        c.nodes["b"] = (again, Recorder())
        await again.start(c.nodes["b"][1])
        await wait_until(lambda: ra.discovered == ["b", "b"], what="rediscovery")
        assert ra.lost == ["b"]
        await wait_until(lambda: again.knows("a"), what="the restarted peer hearing a's hello back")
        again.send_model("a", _upd(round_=4, payload=b"from the checkpoint"))  # not 'out of date': a new run
        await wait_until(lambda: len(ra.models) == 2, what="round 4 after restart")

    run_cluster("ipv8", tmp_path, body)


def test_invalid_updates_are_dropped_at_the_sender(kind, tmp_path, caplog):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a.send_model("b", _upd(round_=-1))
            a.send_model("b", _upd(encoding="x" * 65))
            a.send_model("b", _upd(meta={"blob": "y" * 5000}))
            a.send_model("b", _upd(meta={"nan": float("nan")}))
        assert a.stats.dropped == 4
        assert caplog.text.count("reason=bad_update") == 1
        a.send_model("b", _upd(round_=2))
        await wait_until(lambda: rb.models, what="a valid update")
        assert [m.round for m in rb.models] == [2]

    run_cluster(kind, tmp_path, body)


def test_event_names_use_hyphens(kind, tmp_path, caplog):
    """Log lines are a public interface: every transport event is a hyphenated word, then key=value fields."""
    import re

    async def body(c: Cluster):
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            a, _ = await c.add("a")
            b, rb = await c.add("b", max_model_bytes=1000)
            await c.meet(["a", "b"])
            a.send_model("b", _upd(round_=1, payload=b"\0" * 1001))
            a.send_model("b", _upd(round_=2, payload=b"fits"))
            a.send_model("nobody", _upd())
            a.send_message("nobody", "ping", {})
            await wait_until(lambda: rb.models, what="the model under the limit")
            await b.stop()
            await wait_until(lambda: not a.peers(), what="b lost")
        events = {r.getMessage().split()[0] for r in caplog.records if r.name.startswith("quinkgl.transport")}
        assert {"transport-started", "peer-discovered", "offer-refused", "send-failed", "message-failed", "peer-lost", "transport-stopped"} <= events, events
        assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", e) for e in events), events

    run_cluster(kind, tmp_path, body)


def test_ipv8_duplicate_offer_is_fetched_once(tmp_path, caplog):
    """An offer that arrives again (the sender resends it until fetched) starts no second fetch."""
    from quinkgl_cli.transport.ipv8.settings import Limits

    limits = Limits(offer_resend_after=0.05)

    async def body(c: Cluster):
        a, _ = await c.add("a", limits=limits)
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        gate = asyncio.Semaphore(0)
        b.parts.fetcher.slots = gate  # b is busy: the offer stays unfetched while a resends it
        fetches = []
        fetcher = b.parts.fetcher
        real_fetch = fetcher.fetch

        def counting_fetch(rec, p, meta):
            fetches.append(p.offer_id)
            return real_fetch(rec, p, meta)

        fetcher.fetch = counting_fetch
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            a.send_model("b", _upd(round_=1, payload=b"once"))
            await wait_until(lambda: a.parts.outbox.offers and next(iter(a.parts.outbox.offers.values())).sends == limits.offer_resends, what="resends")
            await wait_until(lambda: caplog.text.count("offer-ignored peer=a reason=duplicate") == limits.offer_resends - 1, what="duplicates seen")
            gate.release()
            await wait_until(lambda: rb.models, what="the model")
            a.send_model("b", _upd(round_=2, payload=b"next"))
            await wait_until(lambda: len(rb.models) == 2, what="the next model")
        assert [bytes(m.payload) for m in rb.models] == [b"once", b"next"]
        assert len(fetches) == 2 and len(set(fetches)) == 2
        assert a.stats.models_sent == 2 and b.stats.dropped == 0

    run_cluster("ipv8", tmp_path, body)


def test_ipv8_trickling_fetch_request_cannot_hold_a_serve_slot(tmp_path, caplog):
    """A client that sends its fetch request a byte at a time, never idle for long, is cut off by the deadline."""
    from quinkgl_cli.transport.ipv8 import stream

    async def main():
        t = _ipv8(tmp_path, "a", connect_timeout=0.5)
        await t.start(Recorder())
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                stream.tune(sock)
                await loop.sock_connect(sock, ("127.0.0.1", t.tcp_port))
                await stream.recv_exact(loop, sock, stream.CHALLENGE.size, 3)
                started = time.monotonic()
                request = stream.REQUEST_HEAD.pack(stream.REQUEST_MAGIC, os.urandom(20), os.urandom(32), 64) + b"\0" * 64
                closed = False
                for i in range(len(request)):  # 0.1 s apart: under the idle timeout, 8 s in all
                    try:
                        await loop.sock_sendall(sock, request[i : i + 1])
                    except OSError:
                        closed = True
                        break
                    await asyncio.sleep(0.1)
                    if time.monotonic() - started > 3:
                        break
                await wait_until(lambda: "reason=timeout" in caplog.text, timeout=3, what="the server to give up")
            assert time.monotonic() - started < 0.5 + 1.5, "the request was allowed to trickle on"
            assert closed or await loop.sock_recv(sock, 1) == b""
        finally:
            sock.close()
            await t.stop()
        assert len([r for r in caplog.records if "serve-failed" in r.getMessage()]) == 1

    asyncio.run(main())


def test_ipv8_connection_closed_before_its_request_is_not_a_warning(tmp_path, caplog):
    """A TCP connection that leaves before asking for an offer (a partner whose fetch was cancelled as it stopped,
    a port check such as `nc -z`) refused nothing and names nobody: DEBUG, not a WARNING per address. A request
    that is malformed still is one."""
    from quinkgl_cli.transport.ipv8 import stream

    async def main():
        t = _ipv8(tmp_path, "a")
        await t.start(Recorder())
        loop = asyncio.get_running_loop()
        try:
            with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
                for read_challenge in (False, True):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    stream.tune(sock)
                    await loop.sock_connect(sock, ("127.0.0.1", t.tcp_port))
                    if read_challenge:
                        await stream.recv_exact(loop, sock, stream.CHALLENGE.size, 3)
                    sock.close()
                await wait_until(lambda: caplog.text.count("reason=no_request") >= 2, what="both closes noticed")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                stream.tune(sock)
                await loop.sock_connect(sock, ("127.0.0.1", t.tcp_port))
                await stream.recv_exact(loop, sock, stream.CHALLENGE.size, 3)
                await loop.sock_sendall(sock, b"\0" * stream.REQUEST_HEAD.size)
                await wait_until(lambda: "reason=malformed_request" in caplog.text, what="the malformed request")
                sock.close()
        finally:
            await t.stop()
        loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert loud == ["fetch-refused peer=127.0.0.1 reason=malformed_request"]
        quiet = [r for r in caplog.records if "reason=no_request" in r.getMessage()]
        assert quiet and all(r.levelno == logging.DEBUG for r in quiet)

    asyncio.run(main())


def test_ipv8_failing_tick_logs_one_traceback_per_exception_type(tmp_path, caplog):
    async def main():
        t = _ipv8(tmp_path, "a", walk_interval=0.01)
        calls = []

        def broken_tick():
            calls.append(1)
            raise (RuntimeError if len(calls) < 20 else ValueError)(f"tick {len(calls)}")

        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            await t.start(Recorder())
            t._tick = broken_tick
            await wait_until(lambda: len(calls) >= 25, what="ticks after the failures")  # the loop goes on
            await t.stop()
        failed = [r for r in caplog.records if r.getMessage().startswith("transport-tick-failed")]
        loud = [r for r in failed if r.levelno >= logging.WARNING]
        assert [r.getMessage().split()[2] for r in loud] == ["reason=RuntimeError", "reason=ValueError"]
        assert all(r.levelno == logging.ERROR and r.exc_info for r in loud)
        assert len(failed) >= 24 and all(r.levelno == logging.DEBUG and not r.exc_info for r in failed if r not in loud)

    asyncio.run(main())


def test_ipv8_failing_event_handler_logs_one_traceback(tmp_path, caplog):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])

        def broken(sender, kind, body):
            rb.messages.append((sender, kind, body))
            raise KeyError("the node's bug")

        rb.on_message = broken
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            for i in range(3):
                a.send_message("b", "ping", {"i": i})
            await wait_until(lambda: len(rb.messages) == 3, what="three messages despite the handler failing")
        loud = [r for r in caplog.records if "event-handler-failed" in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(loud) == 1 and loud[0].exc_info and "reason=on_message:KeyError" in loud[0].getMessage()

    run_cluster("ipv8", tmp_path, body)
