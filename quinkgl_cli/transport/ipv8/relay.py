"""A relay for transfers between peers that cannot connect to each other (``--relay``): the meeting point.

Owns the connections waiting for their partner and the pairs being spliced. Both ends of a transfer connect to
the relay and announce the offer id (`stream.announce`); the second one to arrive is spliced to the first, and
the sender and recipient then run the usual fetch exchange through the relay. The relay never sees a key: it
cannot alter a model (the recipient checks the bytes against the sender's signed offer) nor fetch one (the
sender serves only the holder of the recipient's key).

Bounds: only hosts of current peers may connect; at most ``waiting`` connections wait, each for ``wait`` seconds
(for its partner, or, both ends there, for one of the ``pairs`` transfers that run at once to end: a round's burst
of transfers queues instead of failing); all of them together carry at most ``rate`` bytes a second
(`settings.RelayLimits`); one pair carries at most ``max_model_bytes`` plus headers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from typing import Any

from quinkgl_cli.events import emit
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.peers import PeerTable
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.server import close_socket
from quinkgl_cli.transport.ipv8.settings import TransportSettings

log = logging.getLogger("quinkgl.transport")
CHUNK = 256 * 1024
HEADROOM = 64 * 1024  # protocol bytes besides the model: challenge, request, signature, response header


class RateBudget:
    """One token bucket shared by every relayed transfer: ``rate`` bytes a second, a tenth of a second's burst."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = rate / 10
        self._when = time.monotonic()

    async def spend(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.rate / 10, self._tokens + (now - self._when) * self.rate) - n
        self._when = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Relay:
    def __init__(self, settings: TransportSettings, table: PeerTable, tasks: TaskRegistry, drops: DropLog) -> None:
        self.settings = settings
        self.table = table
        self.tasks = tasks
        self.drops = drops
        self.waiting: OrderedDict[bytes, tuple[socket.socket, asyncio.Task[Any]]] = OrderedDict()
        self.pairs = 0
        self.queued = 0  # pairs whose two ends are here, waiting for a transfer to end
        self._freed = asyncio.Event()  # set when a transfer ends
        self.budget = RateBudget(settings.limits.relay.rate)
        self.carried = 0  # bytes relayed since start

    def join(self, offer_id: bytes, conn: socket.socket, addr: tuple[str, int]) -> bool:
        """Take an announced connection (False: refused, the server closes it)."""
        limits = self.settings.limits.relay
        if not limits.volunteer:
            return False
        if addr[0] not in {rec.address[0] for rec in self.table}:
            self.drops("relay-refused", addr[0], "not_a_peer")
            return False
        partner = self.waiting.pop(offer_id, None)
        if partner is not None:
            partner[1].cancel()
            if self.pairs >= limits.pairs and len(self.waiting) + 2 * (self.queued + 1) > limits.waiting:
                close_socket(partner[0])
                self.drops("relay-refused", addr[0], "busy", pairs=self.pairs, queued=self.queued)
                return False
            self.tasks.spawn(self._when_free(partner[0], conn), "relay")
            return True
        if len(self.waiting) + 2 * self.queued >= limits.waiting:
            self.drops("relay-refused", addr[0], "crowded", waiting=len(self.waiting))
            return False
        self.waiting[offer_id] = (conn, self.tasks.spawn(self._expire(offer_id, conn), "relay-wait"))
        return True

    async def _expire(self, offer_id: bytes, conn: socket.socket) -> None:
        await asyncio.sleep(self.settings.limits.relay.wait)
        if self.waiting.get(offer_id, (None,))[0] is conn:
            del self.waiting[offer_id]
            close_socket(conn)
            self.drops("relay-refused", "-", "partner_missing")

    async def _when_free(self, a: socket.socket, b: socket.socket) -> None:
        """Splice ``a`` and ``b`` once fewer than ``pairs`` transfers run, within ``wait`` seconds; else close both."""
        limits = self.settings.limits.relay
        deadline = time.monotonic() + limits.wait
        self.queued += 1
        try:
            while self.pairs >= limits.pairs:
                left = deadline - time.monotonic()
                if left <= 0:
                    close_socket(a)
                    close_socket(b)
                    self.drops("relay-refused", "-", "busy", pairs=self.pairs, queued=self.queued)
                    return
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), left)
                except TimeoutError:
                    pass  # looked at again above: the wait is over
        except BaseException:
            close_socket(a)
            close_socket(b)
            raise
        finally:
            self.queued -= 1
        self.pairs += 1
        emit(log, logging.DEBUG, "relay-started", context={"node": self.settings.node_id}, pairs=self.pairs)
        await self._splice(a, b)

    async def _splice(self, a: socket.socket, b: socket.socket) -> None:
        cap = self.settings.max_model_bytes + HEADROOM
        started = time.monotonic()
        try:
            activity = [started]  # when either direction last moved: the splice is idle only when both are
            pumps = [asyncio.ensure_future(self._pump(a, b, cap, activity)),
                     asyncio.ensure_future(self._pump(b, a, cap, activity))]
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            moved = sum(t.result() for t in done if not t.cancelled() and t.exception() is None)
            emit(log, logging.DEBUG, "relayed", context={"node": self.settings.node_id}, bytes=moved,
                 seconds=round(time.monotonic() - started, 3))
        finally:
            self.pairs -= 1
            self._freed.set()
            close_socket(a)
            close_socket(b)

    async def _pump(self, src: socket.socket, dst: socket.socket, cap: int, activity: list[float]) -> int:
        """Copy until ``src`` ends or fails, ``cap`` bytes went through, or neither direction moved for
        ``fetch_timeout`` seconds; the number of bytes copied."""
        loop = asyncio.get_running_loop()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        moved = 0
        idle = self.settings.fetch_timeout
        try:
            while moved < cap:
                try:
                    n = await asyncio.wait_for(loop.sock_recv_into(src, view), idle)
                except TimeoutError:
                    if time.monotonic() - activity[0] < idle:
                        continue  # the other direction is busy: a request waits while its answer flows
                    raise
                if n == 0:
                    break
                await self.budget.spend(n)
                await asyncio.wait_for(loop.sock_sendall(dst, view[:n]), idle)
                moved += n
                self.carried += n
                activity[0] = time.monotonic()
        except (OSError, TimeoutError):
            pass  # either end gone or silent: the splice ends, and the recipient's fetch says so
        return moved

    def close(self) -> None:
        for conn, task in self.waiting.values():
            task.cancel()
            close_socket(conn)
        self.waiting.clear()
