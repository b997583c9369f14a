"""Whether peers can open TCP connections to us, and we to them: the checks behind `quinkgl doctor`.

Owns the probes in flight on both sides. Asking: `inbound` sends the peer a signed `PathRequestPayload` with path
``probe`` and a fresh nonce, again every ``ASK_EVERY`` seconds until it is answered or ``connect_timeout`` passed;
the peer answers by connecting to our TCP port and announcing the nonce (`stream.PROBE_MAGIC`), which proves that
a peer there can reach the port. `outbound` connects to a peer's TCP port and announces a probe (the peer takes it
and closes). Answering: `on_request` connects only to the requester's own address and the TCP port its hello
named, one probe per peer at a time and ``MAX_ANSWERING`` at once, so a request can neither aim us at anyone else
nor make us flood.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8 import stream
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.payloads import PathRequestPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.server import close_socket
from quinkgl_cli.transport.ipv8.settings import TransportSettings

PROBE = "probe"  # the path word of a probe request
ASK_EVERY = 0.75  # seconds between repeats of one probe request (a datagram may be lost)
MAX_ANSWERING = 8  # probes we answer at once, all peers together
OPEN = "open"


async def connect_probe(guard: DestinationGuard, target: tuple[str, int], probe_id: bytes, timeout: float) -> str:
    """Connect to ``target`` and announce a probe; ``open`` when the peer's server took it, else why not."""
    if not guard.allows(target[0]):
        guard.refuse(target[0], "tcp")
        return "not_allowed"
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        stream.tune(sock)
        await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
        await stream.announce(loop, sock, stream.PROBE_MAGIC, probe_id, timeout)
        return OPEN
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "connection_refused"
    except stream.FetchError as exc:
        return exc.reason
    except OSError:
        return "unreachable"
    finally:
        close_socket(sock)


class Probes:
    def __init__(self, settings: TransportSettings, courier: Courier, guard: DestinationGuard, tasks: TaskRegistry,
                 drops: DropLog) -> None:
        self.settings = settings
        self.courier = courier
        self.guard = guard
        self.tasks = tasks
        self.drops = drops
        self.waiting: dict[bytes, tuple[str, asyncio.Future[None]]] = {}  # our probe id -> (peer host, answered)
        self.answering: set[str] = set()  # peers whose probe request we are answering now

    # -- asking ----------------------------------------------------------------------------------------------------
    async def inbound(self, rec: PeerRecord, tcp_port: int) -> bool:
        """Whether ``rec`` reached our TCP port when asked to, within ``connect_timeout``."""
        probe_id = os.urandom(stream.OFFER_ID_BYTES)
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[probe_id] = (rec.address[0], answered)
        deadline = time.monotonic() + self.settings.connect_timeout
        try:
            while True:
                self.courier.send(rec.address, PathRequestPayload(self.settings.swarm_id, *self.courier.stamp(), probe_id,
                                                                  PROBE, "", tcp_port))
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                done, _ = await asyncio.wait([answered], timeout=min(ASK_EVERY, left))
                if done:
                    return True
        finally:
            self.waiting.pop(probe_id, None)
            answered.cancel()

    async def outbound(self, rec: PeerRecord) -> str:
        """Whether we reach ``rec``'s TCP port: ``open``, or why not (``timeout``, ``connection_refused``, ...)."""
        return await connect_probe(self.guard, (rec.address[0], rec.tcp_port), os.urandom(stream.OFFER_ID_BYTES),
                                   self.settings.connect_timeout)

    def take(self, probe_id: bytes, conn: socket.socket, addr: tuple[str, int]) -> bool:
        """A probe connection our server accepted: an answer to one of ours when it comes from that peer's host.
        Any other probe only showed that its maker reaches us; it is closed all the same."""
        close_socket(conn)
        waiter = self.waiting.get(probe_id)
        if waiter is not None and waiter[0] == addr[0] and not waiter[1].done():
            waiter[1].set_result(None)
        return True

    # -- answering -------------------------------------------------------------------------------------------------
    def on_request(self, rec: PeerRecord, p: PathRequestPayload) -> None:
        if p.swarm_id != self.settings.swarm_id or rec.via is not None:  # a relayed peer's address is the relay's word
            self.drops("path-refused", rec.node_id, "wrong_swarm" if rec.via is None else "relayed_peer")
            return
        if rec.node_id in self.answering or len(self.answering) >= MAX_ANSWERING:
            return  # a repeat of the request we are answering, or busy enough
        self.answering.add(rec.node_id)
        self.tasks.spawn(self._answer(rec, p.offer_id), f"probe-{rec.node_id}")

    async def _answer(self, rec: PeerRecord, probe_id: bytes) -> None:
        try:
            await connect_probe(self.guard, (rec.address[0], rec.tcp_port), probe_id, self.settings.connect_timeout)
        finally:
            self.answering.discard(rec.node_id)
