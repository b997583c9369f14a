"""LAN discovery (``--lan-discovery``, off by default): daemons of one swarm on one network segment find each other.

Owns the beacon socket and the sources heard. Every ``INTERVAL`` seconds (and at start) a daemon sends a beacon to
the multicast group ``GROUP``:``PORT`` with a time-to-live of 1, so no router passes it on: ``MAGIC``, a version,
the daemon's UDP port and a random tag (its own beacons coming back are known by it), sealed with the swarm key
like every datagram (`seal`). A daemon of the same swarm opens it and walks to the sender's address and that port
(an IPv8 introduction request); the signed hello decides from there, so a beacon only says where to knock, and a
forged one costs a datagram. Beacons that do not open (other swarms', older versions'), from ourselves or from
where our guard may not send are ignored; walks to one source are rate-limited and the sources remembered are
bounded.

IPv8's own LAN bootstrapper is not used: it sends a datagram to each of the 65,535 ports of 255.255.255.255 on
every round of its search. What a beacon tells the segment: that a quinkgl daemon (of some swarm, which only its
members can tell) listens at that address.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from typing import Any

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.seal import OVERHEAD, DatagramSeal

log = logging.getLogger("quinkgl.transport")

GROUP = "239.255.70.71"  # organization-local scope (RFC 2365): never routed off the site, TTL 1 keeps it on the segment
PORT = 47001
MAGIC = b"QGLD"
VERSION = 2  # 2: sealed, no community id inside; 1 named the swarm in clear
BEACON = struct.Struct("<4sBH8s")
INTERVAL = 5.0  # seconds between beacons
WALK_GAP = 2.0  # seconds between two walks towards one source
MAX_SOURCES = 256


class LanBeacon(asyncio.DatagramProtocol):
    def __init__(self, community: Any, seal: DatagramSeal, listen_host: str, udp_port: int, guard: DestinationGuard,
                 node_id: str) -> None:
        self.community = community
        self.seal = seal
        self.listen_host = listen_host
        self.udp_port = udp_port
        self.guard = guard
        self.node_id = node_id
        self.tag = os.urandom(8)
        self.beacon = BEACON.pack(MAGIC, VERSION, udp_port, self.tag)
        self.heard: OrderedDict[tuple[str, int], float] = OrderedDict()  # source -> when we last walked to it
        self.transport: asyncio.DatagramTransport | None = None
        self._sent = float("-inf")

    async def open(self) -> None:
        """Join the group on the listen address's interface and start listening; NetworkError if that fails."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        interface = socket.inet_aton("0.0.0.0" if self.listen_host == "0.0.0.0" else self.listen_host)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # several daemons on one host share it
            sock.bind((GROUP, PORT))  # the group's datagrams only, not whatever else reaches the port
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(GROUP) + interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot start LAN discovery on {self.listen_host} (multicast {GROUP}:{PORT}): {exc.strerror}",
                               "check that this interface supports multicast, or leave --lan-discovery off") from exc
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        self.transport = transport  # type: ignore[assignment]

    def tick(self, now: float) -> None:
        if self.transport is None or now - self._sent < INTERVAL:
            return
        self._sent = now
        try:
            self.transport.sendto(self.seal.seal(self.beacon), (GROUP, PORT))
        except OSError as exc:  # a network that went away: said once, tried again at the next beacon
            emit(log, logging.DEBUG, "lan-beacon-failed", context={"node": self.node_id}, error=exc.strerror or str(exc))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        opened = self.seal.open(data) if len(data) == BEACON.size + OVERHEAD else None
        if opened is None:
            return
        magic, version, port, tag = BEACON.unpack(opened)
        if magic != MAGIC or version != VERSION or port == 0 or tag == self.tag:
            return
        source = (str(addr[0]), int(port))
        if not self.guard.allows(source[0]):
            return
        now = time.monotonic()
        if now - self.heard.get(source, float("-inf")) < WALK_GAP:
            return
        self.heard.pop(source, None)
        self.heard[source] = now
        while len(self.heard) > MAX_SOURCES:
            self.heard.popitem(last=False)
        emit(log, logging.DEBUG, "lan-peer-heard", context={"node": self.node_id}, address=f"{source[0]}:{source[1]}")
        self.community.walk_to(source)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
