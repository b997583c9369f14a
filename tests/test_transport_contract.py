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

    async def add(self, name: str, swarm: str = "sha256:" + "ab" * 32, arch: str = "sha256:" + "cd" * 32, max_model_bytes: int = 64 * 1024 * 1024):
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
        assert caplog.text.count("offer_refused peer=a reason=oversized") == 1

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
        lines = [r.getMessage() for r in caplog.records if "arch_mismatch" in r.getMessage() and "peer=b" in r.getMessage() and "node=a" in r.getMessage()]
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


def test_stopped_peer_is_reported_lost(kind, tmp_path):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        await b.stop()
        await wait_until(lambda: ra.lost == ["b"], what="peer lost")
        assert a.peers() == []
        a.send_model("b", _upd())
        assert a.stats.dropped == 1

    run_cluster(kind, tmp_path, body)
