"""`quinkgl doctor`'s conclusions (`node.diagnosis.assess`, pure) and its report, from made-up observations; the
probes it runs, on loopback transports in this process. Real processes: `test_doctor_e2e.py`; behind NATs:
`test_natlab_e2e.py`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from quinkgl_cli.cli.doctor import _EXIT, render
from quinkgl_cli.errors import ExitCode
from quinkgl_cli.node.diagnosis import NO_PEERS, NOT_REACHABLE, REACHABLE, Observed, PeerObserved, assess
from quinkgl_cli.node.doctor import _Sink
from quinkgl_cli.transport.ipv8 import IPv8Transport

SWARM = "sha256:" + "ab" * 32


def _peer(name: str, tcp_in: bool | None, tcp_out: str, relay: bool = False, seen: str | None = "198.51.100.7:4000",
          routes: tuple[str, ...] = ("direct", "reverse")) -> PeerObserved:
    return PeerObserved(name, f"203.0.113.{len(name)}:7001", seen, tcp_in, tcp_out, relay, list(routes))


def _observed(nat: str, peers: list[PeerObserved], listen: str = "0.0.0.0", seen: tuple[str, ...] = ()) -> Observed:
    return Observed("me", SWARM, listen, f"{listen}:7001", 7001, listen.startswith("127."), nat, list(seen), peers, 10.0, 3.2)


def test_a_public_node_whose_ports_peers_reach_is_reachable() -> None:
    d = assess(_observed("none", [_peer("seed", True, "open"), _peer("pc", True, "timeout")], seen=("0.0.0.0:7001",)))
    assert d.verdict == REACHABLE and d.problems == [] and _EXIT[d.verdict] == ExitCode.OK
    assert [(p.node_id, p.receive, p.send) for p in d.peers] == [("seed", "direct", "direct"), ("pc", "reverse", "direct")]
    assert d.udp_state == "open" and d.tcp_state == "open"


def test_a_firewalled_tcp_port_is_not_reachable_and_says_which_port_to_open() -> None:
    d = assess(_observed("none", [_peer("seed", False, "open")]))
    assert d.verdict == NOT_REACHABLE and d.tcp_state == "closed" and _EXIT[d.verdict] == ExitCode.NOT_REACHABLE
    assert len(d.problems) == 1 and "allow inbound TCP 7001" in d.problems[0]
    assert (d.peers[0].receive, d.peers[0].send) == ("direct", "reverse")  # models still flow: we connect out


def test_a_symmetric_nat_without_a_relay_says_to_run_one() -> None:
    seen = ("198.51.100.7:4000", "198.51.100.7:4999")
    peers = [_peer("seed", False, "open", seen=seen[0]), _peer("pub2", False, "open", seen=seen[1]),
             _peer("natted", False, "timeout", routes=("direct",))]
    d = assess(_observed("symmetric", peers, seen=seen))
    assert d.verdict == NOT_REACHABLE and d.udp_state == "relay_only"
    assert any("symmetric NAT" in p and "--relay" in p for p in d.problems), d.problems
    assert any("forward TCP 7001" in p for p in d.problems), d.problems
    natted = next(p for p in d.peers if p.node_id == "natted")
    assert (natted.receive, natted.send) == ("none", "none")
    assert any("no way for models from and to natted" in p for p in d.problems), d.problems


def test_two_nats_with_a_punched_way_and_no_relay_trade_models_over_udp() -> None:
    peers = [_peer("seed", True, "open"), _peer("natted", False, "timeout", routes=("direct", "udp"))]
    d = assess(_observed("mapped", peers, seen=("198.51.100.7:4000",)))
    natted = next(p for p in d.peers if p.node_id == "natted")
    assert (natted.receive, natted.send) == ("udp", "udp")
    assert not any("no way for models" in p for p in d.problems), d.problems
    relayed = assess(_observed("mapped", [_peer("natted", False, "timeout", routes=("relay:r",))])).peers[0]
    assert (relayed.receive, relayed.send) == ("none", "none")  # met through a relay: no UDP way of its own


def test_a_relay_we_reach_carries_models_between_nats() -> None:
    seen = ("198.51.100.7:4000", "198.51.100.7:4999")
    peers = [_peer("relay", False, "open", relay=True, seen=seen[0]),
             _peer("natted", False, "timeout", routes=("direct", "relay:relay"), seen=seen[1])]
    d = assess(_observed("symmetric", peers, seen=seen))
    natted = next(p for p in d.peers if p.node_id == "natted")
    assert (natted.receive, natted.send) == ("relay:relay", "relay:relay")
    assert d.relays == ["relay"] and not any("run a reachable peer with --relay" in p for p in d.problems), d.problems
    assert d.verdict == NOT_REACHABLE  # its ports still are not reachable: the report says so, and how models travel


def test_one_report_of_a_mapping_cannot_tell_a_symmetric_nat_apart() -> None:
    d = assess(_observed("mapped", [_peer("seed", False, "open")], seen=("198.51.100.7:4000",)))
    assert any("symmetric NAT cannot be told apart" in n for n in d.notes), d.notes
    assert any("forward TCP 7001 and UDP 7001" in p for p in d.problems), d.problems


def test_no_peer_met_is_its_own_verdict_and_names_the_flags_to_check() -> None:
    d = assess(_observed("unknown", [], listen="127.0.0.1"))
    assert d.verdict == NO_PEERS and _EXIT[d.verdict] == ExitCode.NO_PEERS
    assert len(d.problems) == 1 and "--bootstrap-peer" in d.problems[0] and "--timeout" in d.problems[0]
    assert any("loopback" in n for n in d.notes)


def test_the_text_report_has_a_line_per_peer_and_one_per_problem() -> None:
    d = assess(_observed("none", [_peer("seed", False, "open")]))
    text = render(d)
    assert "verdict    not_reachable (exit 8)" in text
    assert [line for line in text.splitlines() if line.startswith("  seed ")]
    assert sum(line.startswith("problem ") for line in text.splitlines()) == len(d.problems) == 1
    assert json.loads(json.dumps(d.as_dict()))["peers"][0]["send"] == "reverse"


async def _started(tmp: Path, name: str, bootstrap: list[str]) -> IPv8Transport:
    t = IPv8Transport(name, SWARM, "sha256:" + "0" * 64, tmp / name, bootstrap=bootstrap, walk_interval=0.1,
                      connect_timeout=1.0)
    await t.start(_Sink())
    return t


def test_probes_find_both_tcp_ports_open_on_loopback(tmp_path: Path) -> None:
    asyncio.run(_both_open(tmp_path))


async def _both_open(tmp_path: Path) -> None:
    a = await _started(tmp_path, "a", [])
    b = await _started(tmp_path, "b", [f"127.0.0.1:{a.address[1]}"])
    try:
        deadline = time.monotonic() + 10
        while not (a.knows("b") and b.knows("a")):
            assert time.monotonic() < deadline, "the two transports never met"
            await asyncio.sleep(0.05)
        assert await b.probe_tcp("a") == (True, "open")
        assert await b.probe_tcp("nobody") is None
        view = b.peer_view("a")
        assert view is not None and view["routes"] == ["direct"] and view["address"] == f"127.0.0.1:{a.address[1]}"
    finally:
        await b.stop()
        await a.stop()


def test_a_probe_to_a_closed_port_says_so() -> None:
    from quinkgl_cli.node.localswarm import free_port
    from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
    from quinkgl_cli.transport.ipv8.probes import connect_probe

    guard = DestinationGuard("127.0.0.1")
    closed = asyncio.run(connect_probe(guard, ("127.0.0.1", free_port()), b"x" * 20, 1.0))
    assert closed == "connection_refused"
    # Bound to loopback, a probe is never sent elsewhere: the guard refuses it before any socket call.
    assert asyncio.run(connect_probe(guard, ("192.0.2.1", 9), b"x" * 20, 1.0)) == "not_allowed"
