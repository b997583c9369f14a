"""The connection an offer's bytes travel over, whatever NAT sits between sender and recipient.

Owns, on the recipient's side, the opening of a connection by a `paths.Route` (direct, reverse, relay; the fourth
way, ``udp``, is no connection: `udpway` runs it, raced against these by `fetcher`), the
reverse connections it waits for, and the choice of routes (`paths.PathBook`); on the sender's side, the
connections it makes out when a recipient asks (`PathRequestPayload`): to the recipient's TCP port (reverse) or to
a relay, or, its serve slots all pushing, a busy reply (`busy`). The fetch exchange then runs over the connection unchanged (`fetcher`, `server.serve`), so every way
carries the same checks. A sender connects only where the request's signer is (its own address) or to a relay
among its own peers: a request cannot point it at anyone else; a peer met through a relay (`forward`), whose
address only the relay vouches for, gets no reverse connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from quinkgl_cli.events import emit
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8 import stream
from quinkgl_cli.transport.ipv8.busy import BusyReplies, SenderBusy
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.outbox import Outbox
from quinkgl_cli.transport.ipv8.paths import DIRECT, RELAY, REVERSE, PathBook, Route
from quinkgl_cli.transport.ipv8.payloads import OfferPayload, PathRequestPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.probes import Probes
from quinkgl_cli.transport.ipv8.relay import Relay
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.server import FetchServer, close_socket
from quinkgl_cli.transport.ipv8.services import Services
from quinkgl_cli.transport.ipv8.settings import TransportSettings
from quinkgl_cli.validation import is_loopback

log = logging.getLogger("quinkgl.transport")
STAGGER = 0.5  # seconds a route has to connect before the next one is tried beside it
ASK_EVERY = 0.75  # seconds between path requests for one transfer while the sender has not answered


def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> asyncio.Future[None]:
    """A future done when ``sock`` has something to read (or is closed); cancelling it stops watching."""
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        loop.remove_reader(fd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    fut.add_done_callback(lambda _: loop.remove_reader(fd))
    return fut


class RouteFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Links:
    def __init__(self, settings: TransportSettings, courier: Courier, services: Services, relay: Relay, outbox: Outbox,
                 server: FetchServer, guard: DestinationGuard, tasks: TaskRegistry, drops: DropLog, probes: Probes,
                 busy: BusyReplies) -> None:
        self.settings = settings
        self.busy = busy
        self.probes = probes
        self.courier = courier
        self.services = services
        self.relay = relay
        self.outbox = outbox
        self.server = server
        self.guard = guard
        self.tasks = tasks
        self.drops = drops
        self.book = PathBook(settings.limits.path_retry_after)
        self.waiting: dict[bytes, tuple[str, asyncio.Future[socket.socket]]] = {}  # offer id -> (sender host, its connection)
        self.pushing: set[bytes] = set()  # offers we are bringing to their recipient over a connection we made
        self.asked_to_push = 0  # path requests received: a recipient could not connect to our TCP port
        server.divert = self.take

    # -- recipient side ------------------------------------------------------------------------------------------
    def routes(self, rec: PeerRecord) -> list[Route]:
        """Ways to try for an offer from ``rec``: on loopback only direct (no NAT there)."""
        if is_loopback(rec.address[0]):
            return [Route(DIRECT)]
        relayed = rec.via is not None  # its datagrams come only through a relay: so will its bytes
        return self.book.routes(rec.node_id, time.monotonic(), self.services.relay_candidates(rec.node_id),
                                reverse=not self.services.behind_nat() and not relayed, direct=not relayed, udp=not relayed)

    async def connect_any(self, rec: PeerRecord, p: OfferPayload, routes: list[Route]) -> tuple[socket.socket, Route]:
        """The first of ``routes`` to connect, each started ``STAGGER`` seconds after the one before unless that
        one failed sooner (a NAT drops a direct attempt silently: waiting out its timeout would cost every first
        transfer seconds). The losers are cancelled and closed; when none connects, SenderBusy if the sender said it
        was busy on one of them, else RouteFailed (the last reason)."""
        waiting = list(routes)
        racing: dict[asyncio.Task[socket.socket], Route] = {}
        reason = "no_path"
        busy: SenderBusy | None = None
        try:
            while waiting or racing:
                if waiting:
                    route = waiting.pop(0)
                    racing[asyncio.ensure_future(self.open(route, rec, p))] = route
                done, _ = await asyncio.wait(racing, timeout=STAGGER if waiting else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    route = racing.pop(task)
                    exc = task.exception()
                    if exc is None:
                        return task.result(), route
                    if isinstance(exc, SenderBusy):
                        busy = exc  # the way works: not remembered as failed
                        continue
                    if not isinstance(exc, RouteFailed):
                        raise exc
                    reason = exc.reason
                    self.failed(rec, route, exc.reason)
            raise busy or RouteFailed(reason)
        except asyncio.CancelledError:
            # Called off while these still tried to connect: another way (UDP) delivered first, so they did not
            # connect in all the time it took. Not proven, they must not pass for fresh: were that way to fail next
            # time, they alone would be tried and it left out for its retry wait (`PathBook.routes`).
            for route in racing.values():
                self.failed(rec, route, "outpaced")
            raise
        finally:
            for task in racing:
                task.cancel()
            for result in await asyncio.gather(*racing, return_exceptions=True):
                if isinstance(result, socket.socket):
                    close_socket(result)  # connected as it was cancelled: a winner is already in use

    async def open(self, route: Route, rec: PeerRecord, p: OfferPayload) -> socket.socket:
        """A connection on which the sender of ``p`` will serve it; RouteFailed with the reason if none came."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.connect_timeout
        try:
            if route.path == REVERSE:
                return await self._reverse(rec, p, timeout)
            if route.path == RELAY:
                assert route.relay is not None
                target = self.services.relay_address(route.relay)
                if target is None:
                    raise RouteFailed("relay_gone")
                sock = await self._connect(loop, target, timeout)
                try:
                    await stream.announce(loop, sock, stream.RELAY_MAGIC, p.offer_id, timeout)
                    await self._asking(rec, p.offer_id, RELAY, route.relay, 0, _readable(loop, sock))
                except BaseException:
                    close_socket(sock)
                    raise
                return sock
            return await self._connect(loop, (rec.address[0], p.tcp_port), timeout)
        except stream.FetchError as exc:
            raise RouteFailed(exc.reason) from None
        except TimeoutError:
            raise RouteFailed("timeout") from None
        except ConnectionRefusedError:
            raise RouteFailed("connection_refused") from None
        except OSError:
            raise RouteFailed("unreachable") from None

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int], timeout: float) -> socket.socket:
        if not self.guard.allows(target[0]):
            self.guard.refuse(target[0], "tcp")
            raise RouteFailed("not_allowed")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            stream.tune(sock)
            await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
        except BaseException:
            close_socket(sock)
            raise
        return sock

    async def _reverse(self, rec: PeerRecord, p: OfferPayload, timeout: float) -> socket.socket:
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self.waiting[p.offer_id] = (rec.address[0], fut)
        try:
            await self._asking(rec, p.offer_id, REVERSE, "", self.server.port, fut)
            return fut.result()
        finally:
            self.waiting.pop(p.offer_id, None)

    async def _asking(self, rec: PeerRecord, offer_id: bytes, path: str, relay: str, tcp_port: int,
                      answered: asyncio.Future[Any]) -> None:
        """Send the path request, again every ``ASK_EVERY`` seconds (a datagram may be lost), until ``answered``
        (the sender's connection came, or its bytes reached the relay), the sender says it is busy (`SenderBusy`) or
        ``connect_timeout`` passed."""
        deadline = time.monotonic() + self.settings.connect_timeout
        try:
            with self.busy.watch(rec, offer_id, path) as told:
                while True:
                    self.courier.send(rec.address, PathRequestPayload(self.settings.swarm_id, *self.courier.stamp(),
                                                                      offer_id, path, relay, tcp_port))
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RouteFailed("sender_silent")
                    await asyncio.wait([answered, told], timeout=min(ASK_EVERY, left), return_when=asyncio.FIRST_COMPLETED)
                    if answered.done():
                        return
                    if told.done():
                        raise SenderBusy(path, told.result())
        finally:
            if not answered.done():
                answered.cancel()

    def take(self, magic: bytes, offer_id: bytes, conn: socket.socket, addr: tuple[str, int]) -> bool:
        """An announced connection our server accepted: a sender we asked for a reverse connection, a relay's, or
        a reachability probe."""
        if magic == stream.PROBE_MAGIC:
            return self.probes.take(offer_id, conn, addr)
        if magic == stream.RELAY_MAGIC:
            return self.relay.join(offer_id, conn, addr)
        waiter = self.waiting.pop(offer_id, None)
        if waiter is None or waiter[0] != addr[0] or waiter[1].done():
            return False  # nobody here asked for it, or it comes from another host than the sender's
        waiter[1].set_result(conn)
        return True

    def done(self, rec: PeerRecord, route: Route, ok: bool, size: int, seconds: float) -> None:
        """What a transfer by ``route`` came to, remembered for the next one from ``rec``."""
        if not ok:
            self.book.failed(rec.node_id, route, time.monotonic())
            return
        changed = self.book.succeeded(rec.node_id, route)
        emit(log, logging.INFO if changed else logging.DEBUG, "transfer", context={"node": self.settings.node_id},
             peer=rec.node_id, path=route.path, relay=route.relay, bytes=size, seconds=round(seconds, 4))

    def failed(self, rec: PeerRecord, route: Route, reason: str) -> None:
        self.book.failed(rec.node_id, route, time.monotonic())
        emit(log, logging.DEBUG, "path-failed", context={"node": self.settings.node_id}, peer=rec.node_id,
             path=route.path, relay=route.relay, reason=reason)

    def forget(self, node_id: str) -> None:
        self.book.forget(node_id)
        self.busy.forget(node_id)

    # -- sender side ---------------------------------------------------------------------------------------------
    def on_path_request(self, rec: PeerRecord, p: PathRequestPayload) -> None:
        """``rec`` cannot fetch our offer directly: bring it over a connection we make, if the request holds."""
        self.asked_to_push += 1
        out = self.outbox.offers.get(p.offer_id)
        if p.swarm_id != self.settings.swarm_id or out is None or out.recipient != rec.node_id:
            self.drops("path-refused", rec.node_id, "unknown_offer")
            return
        if out.serving or p.offer_id in self.pushing:
            return  # already on its way (a repeated request)
        if len(self.pushing) >= self.settings.limits.serve_slots:
            self.busy.reply(rec, p.offer_id, p.path)
            return
        if p.path == REVERSE:
            if rec.via is not None:  # its address is only what a relay told us: connect nowhere on its word
                self.drops("path-refused", rec.node_id, "relayed_peer")
                return
            target, magic = (rec.address[0], p.tcp_port), stream.REVERSE_MAGIC
        elif p.path == RELAY:
            relay = self.services.relay_address(p.relay)
            if relay is None:
                self.drops("path-refused", rec.node_id, "unknown_relay")
                return
            target, magic = relay, stream.RELAY_MAGIC
        else:
            self.drops("path-refused", rec.node_id, "unknown_path")
            return
        self.pushing.add(p.offer_id)
        self.tasks.spawn(self._push(rec, target, magic, p.offer_id, p.path), f"push-{rec.node_id}")

    async def _push(self, rec: PeerRecord, target: tuple[str, int], magic: bytes, offer_id: bytes, path: str) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.connect_timeout
        try:
            try:
                sock = await self._connect(loop, target, timeout)
            except (OSError, RouteFailed) as exc:
                self.drops("push-failed", rec.node_id, getattr(exc, "reason", "unreachable"), path=path)
                return
            try:
                await stream.announce(loop, sock, magic, offer_id, timeout)
            except (OSError, stream.FetchError) as exc:
                close_socket(sock)
                self.drops("push-failed", rec.node_id, getattr(exc, "reason", "unreachable"), path=path)
                return
            await self.server.serve(sock, target, path)  # the usual exchange, we serving; it closes sock
        finally:
            self.pushing.discard(offer_id)

    def state(self) -> dict[str, Any]:
        return {"paths": self.book.snapshot(), "relays": sorted(self.services.relays), "nat": self.services.nat(),
                "tcp": self.tcp_reachability()}

    def tcp_reachability(self) -> str:
        """``open`` once a peer off this host fetched from our TCP port; ``closed`` once peers asked us to connect
        out instead and none ever connected in; else ``unknown``."""
        if self.server.inbound_served:
            return "open"
        return "closed" if self.asked_to_push else "unknown"
