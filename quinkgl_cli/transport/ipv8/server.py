"""Serving our offers over TCP: the listening socket, the accept loop, and the slots that bound concurrent sends.

Owns the listening socket, the connections still proving themselves, and the serve slots. A connection gets the
offer's bytes only after it signs our fresh challenge and both ephemeral keys with the key of the peer the offer
was made to (see `stream`), and then only encrypted with the key that exchange agreed (`channel`). Until it has, it holds no serve slot: it only waits, briefly (``handshake_timeout``), among a bounded
set of pending handshakes where the oldest gives way to a newcomer, so idle or trickling connections, however
many, cannot keep a real recipient out. A recipient holds at most ``serve_slots_per_peer`` slots.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ipv8.keyvault.crypto import default_eccrypto

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.transport.base import TransferDone, TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8 import channel, stream
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.outbox import HASH_IN_THREAD, Outbox, Outgoing
from quinkgl_cli.transport.ipv8.paths import DIRECT, path_name
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.settings import TransportSettings
from quinkgl_cli.validation import is_loopback

log = logging.getLogger("quinkgl.transport")

# A connection that closed before it asked for anything: a partner whose fetch was cancelled as it stopped, or a
# port check (`nc -z`, a container's TCP health probe). Nothing was refused and nobody is named (only an address),
# so it is logged at DEBUG; the fetching side reports its own failures.
NO_REQUEST = "no_request"


def listen_tcp(host: str, udp_port: int, requested_port: int) -> socket.socket:
    """TCP on the UDP port number when one was asked for (one --port to open in a firewall), else any free one."""
    candidates = [udp_port] if requested_port else [udp_port, 0]
    last: OSError | None = None
    for tcp_port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, tcp_port))
            sock.listen(64)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise NetworkError(
        f"cannot bind TCP {host}:{udp_port}: {last.strerror if last else 'unknown error'}",
        "choose another --port",
    )


def close_socket(sock: socket.socket) -> None:
    """Shut down first: a worker thread blocked in send or recv on this socket wakes up instead of lingering."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # never connected, or the other side is gone already: closing is all that is left to do
    sock.close()


class FetchServer:
    def __init__(
        self,
        settings: TransportSettings,
        lsock: socket.socket,
        outbox: Outbox,
        key: Any,
        community_id: bytes,
        guard: DestinationGuard,
        pool: ThreadPoolExecutor,
        tasks: TaskRegistry,
        drops: DropLog,
        stats: TransportStats,
        revoked: Callable[[bytes], bool],
        report: Callable[[TransferDone], None],
    ) -> None:
        self.settings = settings
        self.lsock = lsock
        self.outbox = outbox
        self.key = key
        self.community_id = community_id
        self.guard = guard
        self.pool = pool
        self.tasks = tasks
        self.drops = drops
        self.stats = stats
        self.revoked = revoked
        self.report = report  # each transfer that ends (`Transport.report_transfer`)
        self.slots = asyncio.Semaphore(settings.limits.serve_slots)
        self.pending: dict[socket.socket, asyncio.Task[Any]] = {}  # in arrival order: the oldest gives way first
        self.serving: dict[str, int] = {}  # recipient -> slots it holds
        self.open = True
        self.inbound_served = 0  # offers served over connections peers made to us from off this host (TCP reachable)
        # Takes an announced connection (`stream.announce`): (magic, offer id, socket, address) -> taken?
        self.divert: Callable[[bytes, bytes, socket.socket, tuple[str, int]], bool] | None = None

    @property
    def port(self) -> int:
        return int(self.lsock.getsockname()[1])

    def close(self) -> None:
        self.open = False
        self.lsock.close()

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.open:
            try:
                conn, addr = await loop.sock_accept(self.lsock)
            except OSError as exc:
                if not self.open:
                    return
                emit(log, logging.WARNING, "accept-failed", context={"node": self.settings.node_id}, error=exc.strerror or str(exc))
                await asyncio.sleep(0.1)
                continue
            if not self.guard.allows(addr[0]):
                conn.close()
                self.drops.once("fetch-refused", str(addr[0]), "not_allowed")
                continue
            if len(self.pending) >= self.settings.limits.pending_handshakes:
                oldest = next(iter(self.pending))
                self.pending.pop(oldest).cancel()  # its task closes the socket
                self.drops("fetch-refused", str(addr[0]), "handshake_crowded")
            self.pending[conn] = self.tasks.spawn(self.serve(conn, (str(addr[0]), int(addr[1]))), "serve")

    async def serve(self, conn: socket.socket, addr: tuple[str, int], path: str = DIRECT) -> None:
        """Serve one fetch on ``conn``: accepted from a peer (``direct``), or made by us towards a recipient
        (``reverse``) or a relay (``relay``) when the recipient could not connect to us (see `links`)."""
        loop = asyncio.get_running_loop()
        out: Outgoing | None = None
        who = addr[0]  # the source port of a TCP connection is random: it names nobody
        handed_over = False
        try:
            try:
                got = await self._authenticate(loop, conn, addr)
            finally:
                self.pending.pop(conn, None)
            if got is None:
                handed_over = True
                return
            out, sealer = got
            who = out.recipient
            if self.serving.get(who, 0) >= self.settings.limits.serve_slots_per_peer:
                await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.BUSY, 0))
                out = None
                raise stream.FetchError("peer_busy")
            self.serving[who] = self.serving.get(who, 0) + 1
            try:
                await self._serve_in_slot(loop, conn, out, sealer, path)
                if path == DIRECT and not is_loopback(addr[0]):
                    self.inbound_served += 1
            finally:
                self._release(who)
        except (stream.FetchError, channel.ChannelError) as exc:
            self.drops("fetch-refused", who, exc.reason, level=logging.DEBUG if exc.reason == NO_REQUEST else logging.WARNING)
        except (TimeoutError, OSError) as exc:
            self.drops("serve-failed", who, "timeout" if isinstance(exc, TimeoutError) else "recipient_vanished")
            if out is not None:
                self.outbox.offers.pop(out.offer_id, None)
        finally:
            if not handed_over:
                close_socket(conn)

    def _release(self, who: str) -> None:
        left = self.serving.get(who, 0) - 1
        if left > 0:
            self.serving[who] = left
        else:
            self.serving.pop(who, None)

    async def _authenticate(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                            addr: tuple[str, int]) -> tuple[Outgoing, channel.Sealer] | None:
        """The offer this connection may fetch and the sealer for its bytes: it named one of our offers and signed
        our challenge and both ephemeral keys with the recipient's key, all within the handshake deadline however
        slowly it trickled in; else FetchError. None: the connection was announced for someone else
        (`stream.announce`) and handed over."""
        timeout = min(self.settings.connect_timeout, self.settings.limits.handshake_timeout)
        stream.tune(conn)
        nonce = stream.new_nonce()
        ephemeral = channel.Ephemeral()
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_sendall(conn, stream.CHALLENGE.pack(stream.CHALLENGE_MAGIC, stream.PROTOCOL, nonce, ephemeral.public))
                head = await stream.recv_exact(loop, conn, stream.REQUEST_HEAD.size, timeout)
            except TimeoutError:
                raise
            except (stream.FetchError, OSError) as exc:
                raise stream.FetchError(NO_REQUEST) from exc
            magic, offer_id, theirs, sig_len = stream.REQUEST_HEAD.unpack(head)
            if magic in (stream.REVERSE_MAGIC, stream.RELAY_MAGIC, stream.PROBE_MAGIC) and sig_len == 0:
                if self.divert is not None and self.divert(magic, offer_id, conn, addr):
                    return None
                raise stream.FetchError("not_expected")
            if magic != stream.REQUEST_MAGIC or not 0 < sig_len <= stream.MAX_SIGNATURE:
                raise stream.FetchError("malformed_request")
            signature = await stream.recv_exact(loop, conn, sig_len, timeout)
        out = self.outbox.offers.get(offer_id)
        if out is None:
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.UNKNOWN_OFFER, 0))
            raise stream.FetchError("unknown_offer")
        statement = stream.fetch_statement(self.community_id, offer_id, nonce, self.key.pub().key_to_bin(), ephemeral.public, theirs)
        if not default_eccrypto.is_valid_signature(out.recipient_key, statement, signature):
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.NOT_RECIPIENT, 0))
            raise stream.FetchError("not_recipient")
        if self.revoked(out.recipient_key.key_to_bin()):  # offered before the revocation arrived
            self.outbox.offers.pop(offer_id, None)
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.NOT_RECIPIENT, 0))
            raise stream.FetchError("revoked")
        key = ephemeral.derive(theirs, nonce, channel.context(self.community_id, offer_id, ephemeral.public, theirs))
        return out, channel.Sealer(key)

    async def _serve_in_slot(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, out: Outgoing,
                             sealer: channel.Sealer, path: str) -> None:
        """Wait (briefly) for a serve slot, then send the offer's bytes; the offer is done once they are out."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await self.slots.acquire()
        except TimeoutError:
            await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.BUSY, 0))
            raise stream.FetchError("busy") from None
        try:
            if out.serving:
                await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.BUSY, 0))
                raise stream.FetchError("already_fetching")
            out.serving = True
            started, ok = time.monotonic(), False
            try:
                await self._send(loop, conn, out, sealer)
                ok = True
            finally:
                self._report(out, path, started, ok)
            self.stats.models_sent += 1
            self.stats.bytes_sent += out.size
            self.outbox.served(out)
        finally:
            self.slots.release()

    def _report(self, out: Outgoing, path: str, started: float, ok: bool) -> None:
        self.report(TransferDone("send", out.recipient, out.round, out.size, time.monotonic() - started,
                                 path_name(path), ok))

    async def _send(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, out: Outgoing, sealer: channel.Sealer) -> None:
        budget = self.settings.fetch_timeout + out.size / self.settings.limits.min_rate
        header = stream.RESPONSE.pack(stream.OK, out.size)
        if out.size > HASH_IN_THREAD:
            await loop.run_in_executor(self.pool, stream.send_blob, conn, header, out.payload, budget, sealer)
        else:
            async with asyncio.timeout(budget):
                await loop.sock_sendall(conn, header + b"".join(sealer.frames(out.payload)))
