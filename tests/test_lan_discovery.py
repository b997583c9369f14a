"""LAN discovery's beacons (`transport.ipv8.lan`), without a network: what a heard beacon makes a daemon do. On a
real segment, in the NAT lab: `test_natlab_e2e.py`. Off by default: a daemon without --lan-discovery opens no
multicast socket (`test_transport_ipv8_processes` audits every send of such daemons)."""

from __future__ import annotations

from types import SimpleNamespace

from quinkgl_cli.transport.ipv8 import lan
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.seal import DatagramSeal

OURS = DatagramSeal(b"c" * 32)
THEIRS = DatagramSeal(b"x" * 32)


def _beacon(walks: list[tuple[str, int]], listen: str = "127.0.0.1") -> lan.LanBeacon:
    community = SimpleNamespace(walk_to=walks.append)
    return lan.LanBeacon(community, OURS, listen, 7001, DestinationGuard(listen), "me")


def _sealed(magic: bytes = lan.MAGIC, version: int = lan.VERSION, port: int = 7002, seal: DatagramSeal = OURS) -> bytes:
    return seal.seal(lan.BEACON.pack(magic, version, port, b"t" * 8))


def test_a_beacon_of_our_swarm_is_walked_to_at_its_port_once_per_gap() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    datagram = _sealed()
    b.datagram_received(datagram, ("127.0.0.2", lan.PORT))
    b.datagram_received(datagram, ("127.0.0.2", lan.PORT))  # within WALK_GAP: not again
    assert walks == [("127.0.0.2", 7002)]


def test_beacons_of_other_swarms_versions_ourselves_or_garbage_are_ignored() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    clear = lan.BEACON.pack(lan.MAGIC, lan.VERSION, 7002, b"t" * 8)
    tampered = bytearray(_sealed())
    tampered[-1] ^= 1
    for datagram in (_sealed(seal=THEIRS),  # another swarm's key
                     clear,  # unsealed
                     clear + bytes(28),
                     bytes(tampered),
                     _sealed(version=lan.VERSION + 1),
                     _sealed(magic=b"XXXX"),
                     _sealed(port=0),
                     OURS.seal(b.beacon),  # our own, back through the loop
                     b"short"):
        b.datagram_received(datagram, ("127.0.0.2", lan.PORT))
    assert walks == []


def test_a_loopback_daemon_never_walks_off_loopback_whatever_a_beacon_says() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks, listen="127.0.0.1")
    # A documentation address (RFC 5737), never sent to: the guard refuses it before any walk.
    b.datagram_received(_sealed(), ("192.0.2.2", lan.PORT))
    assert walks == []


def test_the_sources_remembered_are_bounded() -> None:
    walks: list[tuple[str, int]] = []
    b = _beacon(walks)
    for i in range(lan.MAX_SOURCES + 50):
        b.datagram_received(_sealed(port=1000 + i), ("127.0.0.2", lan.PORT))
    assert len(walks) == lan.MAX_SOURCES + 50 and len(b.heard) == lan.MAX_SOURCES
