"""LAN discovery's beacons (`transport.ipv8.lan`), without a network: what a heard beacon makes a daemon do. On a
real segment, in the NAT lab: `test_natlab_e2e.py`. Off by default: a daemon without --lan-discovery opens no
multicast socket (`test_transport_ipv8_processes` audits every send of such daemons)."""

from __future__ import annotations

from types import SimpleNamespace

from quinkgl_cli.transport.ipv8 import lan
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard

OURS = b"c" * 20


def _beacon(walks: list[tuple[str, int]], listen: str = "127.0.0.1") -> lan.LanBeacon:
    community = SimpleNamespace(community_id=OURS, walk_to=walks.append)
    return lan.LanBeacon(community, listen, 7001, DestinationGuard(listen), "me")


def test_a_beacon_of_our_swarm_is_walked_to_at_its_port_once_per_gap() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    datagram = lan.BEACON.pack(lan.MAGIC, lan.VERSION, OURS, 7002, b"t" * 8)
    b.datagram_received(datagram, ("127.0.0.2", lan.PORT))
    b.datagram_received(datagram, ("127.0.0.2", lan.PORT))  # within WALK_GAP: not again
    assert walks == [("127.0.0.2", 7002)]


def test_beacons_of_other_swarms_versions_ourselves_or_garbage_are_ignored() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    for datagram in (lan.BEACON.pack(lan.MAGIC, lan.VERSION, b"x" * 20, 7002, b"t" * 8),
                     lan.BEACON.pack(lan.MAGIC, lan.VERSION + 1, OURS, 7002, b"t" * 8),
                     lan.BEACON.pack(b"XXXX", lan.VERSION, OURS, 7002, b"t" * 8),
                     lan.BEACON.pack(lan.MAGIC, lan.VERSION, OURS, 0, b"t" * 8),
                     b.beacon,  # our own, back through the loop
                     b"short"):
        b.datagram_received(datagram, ("127.0.0.2", lan.PORT))
    assert walks == []


def test_a_loopback_daemon_never_walks_off_loopback_whatever_a_beacon_says() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks, listen="127.0.0.1")
    # A documentation address (RFC 5737), never sent to: the guard refuses it before any walk.
    b.datagram_received(lan.BEACON.pack(lan.MAGIC, lan.VERSION, OURS, 7002, b"t" * 8), ("192.0.2.2", lan.PORT))
    assert walks == []


def test_the_sources_remembered_are_bounded() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    for i in range(lan.MAX_SOURCES + 50):
        b.datagram_received(lan.BEACON.pack(lan.MAGIC, lan.VERSION, OURS, 1000 + i, b"t" * 8), ("127.0.0.2", lan.PORT))
    assert len(walks) == lan.MAX_SOURCES + 50 and len(b.heard) == lan.MAX_SOURCES
