"""A UDP endpoint that binds exactly where it is told, refuses to send where it must not, and seals what it sends.

IPv8's own endpoint silently moves to the next free port when the asked one is taken, and happily sends to
whatever address a peer claims (its LAN address, a puncture target). Bound to loopback, this endpoint drops
every datagram for a non-loopback destination, so nothing ever leaves the machine.

Every datagram passes here, whoever built it (our messages, IPv8's introductions and punctures), so this is where
the swarm key seals them on the way out and opens them on the way in (`seal`); one that does not open is reported
to ``on_foreign`` and read no further. An opened packet that starts with `udpwire.MAGIC` is a model transfer's
control datagram (`udpway`): it goes to ``on_transfer`` instead of IPv8, which never parses it. A model's chunks
are sealed under their transfer's own key instead of the swarm key (`udpwire`): they leave as they are
(`send_sealed`), and every datagram that comes in is first offered to ``on_chunk``, which opens it if it is a chunk
of a transfer from its source address; only what it does not take goes on to the swarm seal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from ipv8.messaging.interfaces.udp.endpoint import UDPEndpoint

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.common import HostVerdicts, OnceLog
from quinkgl_cli.transport.ipv8.seal import DatagramSeal
from quinkgl_cli.transport.ipv8.udpwire import MAGIC
from quinkgl_cli.validation import is_loopback

log = logging.getLogger("quinkgl.transport")
SO_MEMINFO = 55  # Linux: the socket's memory counters, the receive queue's bytes first and its limit second
IPV8_PREFIX = b"\x00\x02"  # starts every cleartext IPv8 community packet (an older quinkgl's, another application's)
DRAIN = 64  # datagrams read at once after a transfer's datagram, without a turn of the event loop each
RECV_MAX = 65536
UDP_SEGMENT = 103  # Linux's UDP generic segmentation offload (socket.UDP_SEGMENT from Python 3.12)
SEGMENTS = 48  # datagrams per segmented send: the whole must stay under 64 KiB (48 * 1,260 bytes does)


class DestinationGuard:
    """Decides which destinations may be contacted, over UDP and TCP alike."""

    def __init__(self, listen_host: str) -> None:
        self.loopback_only = is_loopback(listen_host)
        self.blocked = 0
        self._once = OnceLog(log)
        self.allows = HostVerdicts(self._judge)

    def _judge(self, host: Any) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except (ValueError, TypeError):
            return False  # never resolve names on the hot path: a DNS query is traffic too
        if addr.is_unspecified or addr.is_multicast:
            return False
        return addr.is_loopback or not self.loopback_only

    def refuse(self, host: Any, what: str) -> None:
        self.blocked += 1
        self._once("send-blocked", str(host), "non_loopback_destination", via=what)


class GuardedUDPEndpoint(UDPEndpoint):
    # Set by UDPEndpoint.__init__, which pyipv8 leaves unannotated.
    _running: bool
    _port: int

    def __init__(self, listen_host: str, port: int, guard: DestinationGuard, seal: DatagramSeal) -> None:
        super().__init__(port=port, ip=listen_host)
        self.guard = guard
        self.seal = seal
        self._logger = logging.getLogger("quinkgl.transport.ipv8")
        self.on_foreign: Callable[[Any, str], None] | None = None  # (source, reason) of a datagram not for us
        self.on_transfer: Callable[[Any, bytes], None] | None = None  # (source, packet) of a UDP transfer's datagram
        self.on_chunk: Callable[[Any, bytes], bool] | None = None  # (source, datagram): True when a transfer's chunk
        self._sock: socket.socket | None = None
        self._segmenting = hasattr(socket, "SOL_UDP") and hasattr(socket.socket, "sendmsg")  # off once refused

    def datagram_received(self, datagram: bytes, addr: Any) -> None:
        if self._take(datagram, addr):
            self._drain()

    def _take(self, datagram: bytes, addr: Any) -> bool:
        """Handle one datagram; True when it was a transfer's (more are likely queued behind it)."""
        if self._running and self.on_chunk is not None and self.on_chunk(addr, datagram):
            return True
        packet = self.seal.open(datagram)
        if packet is None:
            if self._running and self.on_foreign is not None:
                self.on_foreign(addr, "cleartext" if datagram[:2] == IPV8_PREFIX else "other_swarm")
            return False
        if packet[:4] == MAGIC:
            if self._running and self.on_transfer is not None:
                self.on_transfer(addr, packet)
            return True
        super().datagram_received(packet, addr)
        return False

    def _drain(self) -> None:
        """Read what is queued behind a transfer's datagram at once: asyncio reads one datagram per turn of the
        loop, which cost a UDP transfer a third of its receiving time."""
        for _ in range(DRAIN):
            if self._sock is None or not self._running:
                return
            try:
                datagram, addr = self._sock.recvfrom(RECV_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # asyncio's reader meets the same error on its next turn and reports it
            self._take(datagram, addr)

    def notify_listeners(self, packet: tuple[Any, bytes]) -> None:
        """IPv8 drops a packet no community claims without a word; we tell the owner."""
        if packet[1][: self.prefixlen] not in self._prefix_map and self.on_foreign is not None:
            if self._prefix_map:  # none at all: our community is not loaded yet or unloaded (stopping)
                self.on_foreign(packet[0], "other_community")
            return
        super().notify_listeners(packet)

    def backlog(self) -> float:
        """How full our receive queue is (0 to about 1): datagrams the kernel holds that we have not read yet.
        0 where the system does not say (SO_MEMINFO is Linux's)."""
        sock = self._transport.get_extra_info("socket") if self._running and self._transport is not None else None
        if sock is None:
            return 0.0
        try:
            used, limit = struct.unpack("2I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 8))
        except (OSError, struct.error):
            return 0.0
        return used / limit if limit else 0.0

    def send_sealed(self, socket_address: tuple[str, int], datagrams: list[bytes]) -> None:
        """Datagrams sealed already (a transfer's chunks, under its own key), sent as they are. Where the system
        segments UDP (Linux), datagrams of one size go in one system call and the kernel cuts them apart: a model's
        chunks, one call for every ``SEGMENTS`` instead of one each (receivers see ordinary datagrams)."""
        if not self.guard.allows(socket_address[0]):
            self.guard.refuse(socket_address[0], "udp")
            return
        if not self._running:
            return
        for start in range(0, len(datagrams), SEGMENTS):
            batch = datagrams[start : start + SEGMENTS]
            if not self._segmented(socket_address, batch):
                for datagram in batch:
                    super().send(socket_address, datagram)

    def _segmented(self, address: tuple[str, int], batch: list[bytes]) -> bool:
        size = len(batch[0])
        if (not self._segmenting or self._sock is None or len(batch) < 2 or self.queued()
                or any(len(d) != size for d in batch[:-1]) or len(batch[-1]) > size):
            return False
        try:
            self._sock.sendmsg([b"".join(batch)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, address)
        except (BlockingIOError, InterruptedError):
            return False  # the send queue is full: asyncio's transport queues them one by one
        except OSError:
            self._segmenting = False  # not on this system (or this route): one datagram per call from now on
            return False
        self.bytes_up += sum(map(len, batch))
        return True

    def queued(self) -> int:
        """Bytes of datagrams waiting in our send queue (asyncio's, once the kernel's is full)."""
        if not self._running or self._transport is None:
            return 0
        size = getattr(self._transport, "get_write_buffer_size", None)  # asyncio's transports have it, the base class not
        return int(size()) if size is not None else 0

    async def open(self) -> bool:
        """Bind exactly ``(ip, port)`` or raise NetworkError; never walk to another port."""
        if self._running:
            return True
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 870400)
            sock.bind((self._ip, self._port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise NetworkError(
                f"cannot bind UDP {self._ip}:{self._port}: {exc.strerror}",
                "choose another --port (or 0 for any free port) or --listen address",
            ) from exc
        bound = sock.getsockname()
        if self._port and bound[1] != self._port:
            sock.close()
            raise NetworkError(f"asked for UDP port {self._port} but got {bound[1]}")
        self._port = bound[1]
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._sock = sock
        self._running = True
        return True

    def send(self, socket_address: Any, packet: bytes) -> None:
        host = socket_address[0] if isinstance(socket_address, tuple) and socket_address else socket_address
        if not self.guard.allows(host):
            self.guard.refuse(host, "udp")
            return
        if not self._running:
            return
        super().send(socket_address, self.seal.seal(packet))
