"""Split healing: a node whose swarm falls apart says so once (`swarm-split`), asks its transport to reach out
again, and says `swarm-healed` when the peers cut off are back. Over the memory transport (its `partition` and
`heal`), then the IPv8 transport's part on loopback: peers lost to silence are remembered, and knocking at them
brings a swarm whose seed has gone back together."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from quinkgl_cli.node.splitwatch import SplitWatch
from quinkgl_cli.strategies.spectral import GossipGraphMonitor
from quinkgl_cli.transport.base import PeerInfo
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport


class _Peer:
    """What the split watch reads of a node: its id, the peers it knows (kept by its transport's events), its
    observed gossip graph and its transport."""

    def __init__(self, net: MemoryNetwork, node_id: str) -> None:
        self.node_id = node_id
        self.known_peers: dict[str, PeerInfo] = {}
        self.graph = SimpleNamespace(monitor=GossipGraphMonitor(window=10, every=5))
        self.transport = MemoryTransport(net, node_id)
        self.transport.start_sync(self)

    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.known_peers[peer.node_id] = peer

    def on_peer_lost(self, peer: PeerInfo) -> None:
        self.known_peers.pop(peer.node_id, None)

    def on_model(self, update: Any) -> None:
        return None

    def on_message(self, sender: str, kind: str, body: Any) -> None:
        return None


def _lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().split(" ")[0] == event]


def _swarm() -> tuple[MemoryNetwork, dict[str, _Peer]]:
    net = MemoryNetwork()
    peers = {n: _Peer(net, n) for n in "abcd"}
    net.deliver_all()
    for u, v in (("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")):  # a ring of exchanges, round 1
        for p in peers.values():
            p.graph.monitor.record(u, v, 1)
    return net, peers


def test_a_partition_is_said_once_and_its_healing_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quinkgl.daemon")
    net, peers = _swarm()
    watch = SplitWatch(peers["a"], ["127.0.0.1:7001"])  # type: ignore[arg-type]
    watch.check(1)
    assert not _lines(caplog, "swarm-split")
    net.partition(["a", "b"], ["c", "d"])
    net.deliver_all()
    assert sorted(peers["a"].transport.cut_off()) == ["c", "d"]
    watch.check(2)
    watch.check(3)  # still apart: not said again
    (line,) = _lines(caplog, "swarm-split")
    assert "cut_off=[c,d]" in line and "components=2" in line and "component=2" in line and "lambda2=0.0" in line, line
    assert "seeds=1" in line and "knocking=2" in line, line
    net.heal()
    net.deliver_all()
    watch.check(4)
    (healed,) = _lines(caplog, "swarm-healed")
    assert "rejoined=[c,d]" in healed and "not_back=[]" in healed and "rounds=2" in healed, healed
    assert peers["a"].transport.cut_off() == [] and set(peers["a"].known_peers) == {"b", "c", "d"}


def test_the_split_heals_when_a_peer_from_across_the_cut_is_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quinkgl.daemon")
    net, peers = _swarm()
    watch = SplitWatch(peers["a"], [])  # type: ignore[arg-type]
    net.partition(["a", "b"], ["c", "d"])
    net.deliver_all()
    watch.check(2)
    net.kill("d")  # gone while the swarm was apart: a never hears of it
    net.heal()
    net.deliver_all()
    watch.check(3)
    (healed,) = _lines(caplog, "swarm-healed")
    assert "rejoined=[c]" in healed and "not_back=[d]" in healed, healed


def test_peers_falling_silent_one_after_another_are_one_split(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quinkgl.daemon")
    net, peers = _swarm()
    watch = SplitWatch(peers["a"], [])  # type: ignore[arg-type]
    net.partition(["a", "b"], ["c"])
    net.deliver_all()
    watch.check(2)  # c alone so far
    net.partition(["a", "b"], ["d"])
    net.deliver_all()
    watch.check(3)  # d too: the same split, not a second one
    net.kill("d")
    net.heal()
    net.deliver_all()
    watch.check(4)
    assert len(_lines(caplog, "swarm-split")) == 1
    (healed,) = _lines(caplog, "swarm-healed")
    assert "rejoined=[c]" in healed and "not_back=[d]" in healed, healed
    watch.check(5)  # d stays missing: knocked at on, no new split line
    assert len(_lines(caplog, "swarm-split")) == 1


def test_peers_that_say_goodbye_do_not_split_the_swarm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quinkgl.daemon")
    net, peers = _swarm()
    watch = SplitWatch(peers["a"], [])  # type: ignore[arg-type]
    peers["c"].transport.stop_sync()
    peers["d"].transport.stop_sync()
    net.deliver_all()
    watch.check(2)
    assert set(peers["a"].known_peers) == {"b"} and not _lines(caplog, "swarm-split")


def test_a_crashed_peer_that_never_comes_back_ends_as_given_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quinkgl.daemon")
    net, peers = _swarm()
    watch = SplitWatch(peers["a"], [])  # type: ignore[arg-type]
    net.kill("d")
    net.deliver_all()
    watch.check(2)
    assert "cut_off=[d]" in _lines(caplog, "swarm-split")[0]
    peers["a"].transport._cut.clear()  # the transport forgot it (the IPv8 transport does after FORGET_AFTER)
    watch.check(3)
    (line,) = _lines(caplog, "swarm-split-given-up")
    assert "not_back=[d]" in line and "rejoined=[]" in line, line


# -- the IPv8 transport's part: remembering peers lost to silence, and knocking at them --------------------------------
SWARM = "sha256:" + "5e" * 32


class _Sink:
    def on_peer_discovered(self, peer: PeerInfo) -> None:
        return None

    def on_peer_lost(self, peer: PeerInfo) -> None:
        return None

    def on_model(self, update: Any) -> None:
        return None

    def on_message(self, sender: str, kind: str, body: Any) -> None:
        return None


def _cut_between(transport: Any, ports: set[int]) -> None:
    """Drop every datagram ``transport`` sends to one of ``ports`` (a network split, as seen from one side)."""
    endpoint = transport.parts.endpoint
    send = endpoint.send
    endpoint.send = lambda address, packet: None if address[1] in ports and transport.blocked else send(address, packet)
    transport.blocked = True


async def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.05)


async def _split_and_rejoin(tmp: Path) -> dict[str, Any]:
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    def make(name: str, bootstrap: list[str]) -> IPv8Transport:
        return IPv8Transport(name, SWARM, "sha256:" + "0" * 64, tmp / name, bootstrap=bootstrap, walk_interval=0.1,
                             heartbeat_interval=0.3, silence_timeout=1.5)

    seed = make("seed", [])
    await seed.start(_Sink())
    seed_at = f"127.0.0.1:{seed.address[1]}"
    a, c = make("a", [seed_at]), make("c", [seed_at])
    await a.start(_Sink())
    await c.start(_Sink())
    out: dict[str, Any] = {}
    try:
        await _until(lambda: a.knows("c") and c.knows("a"), 15, "meeting through the seed")
        _cut_between(a, {seed.address[1], c.address[1]})
        _cut_between(seed, {a.address[1]})
        _cut_between(c, {a.address[1]})
        await _until(lambda: set(a.cut_off()) == {"seed", "c"} and "a" in c.cut_off(), 10, "the split")
        await seed.stop()  # the only seed goes while the swarm is apart: nobody walks to anybody any more
        await _until(lambda: "seed" not in c.cut_off() and not c.knows("seed"), 10, "the seed's goodbye")
        for t in (a, c):
            t.blocked = False  # type: ignore[attr-defined]
        await asyncio.sleep(2.0)
        out["met_without_rejoin"] = a.knows("c") or c.knows("a")
        out["knocking"] = a.rejoin()
        started = time.monotonic()
        await _until(lambda: a.knows("c") and c.knows("a"), 15, "the swarm back together")
        out["rejoined_s"] = time.monotonic() - started
        out["a_cut_off"] = a.cut_off()
        out["c_cut_off"] = c.cut_off()
    finally:
        await a.stop()
        await c.stop()
        await seed.stop()
    return out


def test_knocking_at_peers_lost_to_silence_rejoins_a_swarm_whose_seed_is_gone(tmp_path: Path) -> None:
    out = asyncio.run(_split_and_rejoin(tmp_path))
    assert out["met_without_rejoin"] is False  # the network healed, yet nothing would have brought them together
    assert out["knocking"] == 2 and out["rejoined_s"] < 10
    assert out["a_cut_off"] == ["seed"] and out["c_cut_off"] == []  # the seed is still missed; c is back
