"""Peers behind NATs, in the NAT lab (`natlab`: Linux network namespaces inside ``unshare --net --mount``, the
private range 10.201.0.0/16 only in there). Each test runs one scenario of `natlab_scenarios` in a fresh lab; the
scenario asserts what it expects and also checks that no namespace sent a packet outside the test range and
loopback (iptables counters) and that no probe connected anywhere else (the probes' socket audit).

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2 or iptables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import natlab

pytestmark = [pytest.mark.e2e, pytest.mark.natlab]
SCENARIOS = Path(__file__).resolve().parent / "natlab_scenarios.py"
_REASON: list[str | None] = []


def _lab(name: str, tmp_path: Path) -> dict[str, Any]:
    if not _REASON:
        _REASON.append(natlab.unavailable())
    if _REASON[0] is not None:
        pytest.skip(_REASON[0])
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCENARIOS), name, str(out)], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["leaks"] and all(n == 0 for n in result["leaks"].values())
    return result


def test_introductions_punch_through_cone_nats_but_not_symmetric_to_restricted(tmp_path: Path) -> None:
    r = _lab("discovery", tmp_path)
    met = r["met"]
    assert met["full1-rest1"] and met["rest1-rest2"] and met["full1-sym1"] and met["seed-sym1"], met
    assert not met["rest1-sym1"] and not met["rest2-sym1"], met  # a symmetric NAT cannot be punched from a restricted one
    # Without a relay, a NATed sender still reaches a public recipient (reverse), and another NATed peer it punched
    # a way to over that UDP way (no TCP way connects between two NATs).
    assert [t["arrived"] for t in r["transfers"]] == [True, True, True, True], r["transfers"]
    assert all(any("path=udp" in line for line in t["paths"]) for t in r["transfers"][2:]), r["transfers"]


def test_each_transfer_takes_the_way_the_nats_leave_and_keeps_it(tmp_path: Path) -> None:
    r = _lab("paths", tmp_path)
    ways = {(t["from"], t["to"]): t["path"] for t in r["again"]}
    assert ways[("rest1", "seed")] == "reverse" and ways[("blocked", "seed")] == "reverse"  # TCP in closed: reverse
    assert ways[("rest1", "rest2")] == "relay:seed" and ways[("full1", "sym1")] == "relay:seed"  # both closed: relay
    # The way is remembered: the second model does not wait for the direct attempt to time out again.
    assert all(t["seconds"] < 2.0 for t in r["again"]), r["again"]


def test_a_relay_leaving_mid_transfer_fails_fast_and_the_next_model_takes_another_relay(tmp_path: Path) -> None:
    r = _lab("relay_leaves", tmp_path)
    assert "path=relay" in r["failure"]["log"] and r["failure"]["after_s"] < 10
    assert r["retry"]["arrived"] and r["retry"]["path"] != f"relay:{r['failure']['relay']}"


def test_real_daemons_behind_nats_form_one_swarm(tmp_path: Path) -> None:
    r = _lab("daemons", tmp_path)
    assert all(p["aggregations"] > 0 for p in r["peers"].values()), r["peers"]
    assert {"rest1=reverse", "full1=reverse", "sym1=reverse"} <= set(r["peers"]["seed"]["paths"])
    assert "sym1=relay:seed" in r["peers"]["full1"]["paths"]
    # A symmetric and a port-restricted NAT: no datagram passes between them; they meet, and trade models, through
    # the relay (control messages and bytes alike).
    assert all(p["peers_met"] == 3 for p in r["peers"].values()), r["peers"]
    assert "sym1=relay:seed" in r["peers"]["rest1"]["paths"] and "rest1=relay:seed" in r["peers"]["sym1"]["paths"], r["peers"]
    # Each end's trace names the way the bytes took: the fetcher's receive and the server's send.
    traced = {name: set(peer["traced"]) for name, peer in r["peers"].items()}
    assert {"receive:rest1=reverse", "receive:sym1=reverse"} <= traced["seed"], traced
    assert "send:seed=reverse" in traced["rest1"] and "send:full1=relay" in traced["sym1"], traced
    assert "receive:sym1=relay" in traced["full1"], traced


def test_peers_whose_tcp_is_blocked_behind_nats_trade_models_over_the_punched_udp_way(tmp_path: Path) -> None:
    r = _lab("udp_daemons", tmp_path)
    # No relay and no TCP anywhere between them: every model went over UDP, both ends say so, and all aggregated.
    for name, peer in r["peers"].items():
        assert peer["aggregations"] > 0 and peer["peers_met"] == 2, (name, peer)
        assert peer["paths"] and all(p.endswith("=udp") for p in peer["paths"]), (name, peer["paths"])
        assert any(t.startswith("send:") and t.endswith("=udp") for t in peer["traced"]), (name, peer["traced"])


def test_doctor_behind_a_symmetric_nat_says_a_relay_is_needed(tmp_path: Path) -> None:
    r = _lab("doctor", tmp_path)
    alone, relayed, rest = r["without_relay"], r["with_relay"], r["restricted"]
    for report in (alone, relayed):
        assert report["exit"] == 8 and report["verdict"] == "not_reachable", report
        assert report["nat"] == "symmetric" and report["udp_state"] == "relay_only" and report["tcp_state"] == "closed"
        assert len(report["seen_as"]) >= 2  # each public peer saw another mapping
        # It reaches the public peers' TCP ports (their models come direct), they never reach its (ours go reverse).
        assert {(p["node_id"], p["receive"], p["send"]) for p in report["peers"]} >= {("seed", "direct", "reverse"),
                                                                                    ("pub2", "direct", "reverse")}
    assert any("symmetric NAT" in p and "run a reachable peer with --relay" in p for p in alone["problems"]), alone
    assert alone["relays"] == [] and relayed["relays"] == ["relay1"]
    assert any("symmetric NAT" in p and "only through a relay" in p for p in relayed["problems"]), relayed
    assert not any("run a reachable peer with --relay" in p for p in relayed["problems"]), relayed
    # Behind a port-restricted NAT: one mapping seen by every peer, the ports to forward named.
    assert rest["exit"] == 8 and rest["nat"] == "mapped" and rest["udp_state"] == "punch" and len(rest["seen_as"]) == 1
    assert any("forward TCP 7001 and UDP 7001" in p for p in rest["problems"]), rest


def test_daemons_split_by_the_network_say_so_and_find_each_other_again_without_their_seed(tmp_path: Path) -> None:
    r = _lab("split", tmp_path)
    assert r["p2_split"]["cut_off"] == ["seed"] or set(r["p2_split"]["cut_off"]) == {"seed", "p1"}, r["p2_split"]
    assert r["p1_split"]["cut_off"] == ["p2"] and r["p1_split"]["lambda2"] == 0.0, r["p1_split"]
    # The seed left while the network was apart (p2 never heard its goodbye): only knocking at the peer each lost
    # brings p1 and p2 together again.
    assert r["p2_healed"]["rejoined"] == ["p1"] and r["p2_healed"]["not_back"] == ["seed"], r["p2_healed"]
    assert r["p1_healed"]["rejoined"] == ["p2"], r["p1_healed"]
    assert r["models_after_heal"] and r["healed_after_s"] < 40


def test_lan_discovery_finds_peers_on_the_segment_and_only_those_that_turned_it_on(tmp_path: Path) -> None:
    r = _lab("lan", tmp_path)
    assert all(r["met"].values()), r["met"]  # no seed, no rendezvous: beacons only
    assert r["quiet_met"] == [] and r["met_quiet"] == []


def test_the_lab_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where a tool is missing the lab's tests skip with this reason: they never pass without running.
    monkeypatch.setattr(natlab, "_tool", lambda name: None if name == "iptables" else f"/usr/bin/{name}")
    reason = natlab.unavailable()
    assert reason is not None and "iptables" in reason
