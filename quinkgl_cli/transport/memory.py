"""The in-memory transport: the IPv8 transport's behaviour without sockets, for tests and the simulator.

Everything goes through a `MemoryNetwork` hub that queues deliveries. Two ways to drive it:

* lockstep (a simulator, no asyncio loop needed): call ``network.deliver_all()`` whenever queued deliveries
  should happen; it runs every event handler in FIFO order, deterministically;
* asyncio (the daemon loop, contract tests): with ``auto_deliver=True`` (the default) a send made while a loop is
  running schedules a drain with ``loop.call_soon``, so events arrive on the loop as they would from IPv8.

Admission: given an `Admission`, a transport refuses the hello of a peer its certificate (or the revocation list)
does not admit, as the IPv8 transport does; revocation lists do not spread here (that is the IPv8 transport's
gossip).

Fault injection (``loss``, ``block``, ``partition``, ``corrupt``, ``kill``) mirrors what the IPv8 transport meets
on a real network, and the receiver-side checks (size limit, digest, duplicate and out-of-date offers, swarm and
architecture mismatch) are the same ones, logged once per peer and reason on ``quinkgl.transport``.

Peer views are bounded as IPv8's peer table is: a transport knows at most ``max_peers`` peers (the IPv8
transport's default, `DEFAULT_MAX_PEERS`); the network never introduces it to more. Discovery stands
in for IPv8's random walk: a joining transport is introduced to up to ``seek`` random peers of its swarm that
still have room (default half of ``max_peers``), and one that loses a peer is introduced to others until it is
back at ``seek``. Seeking less than the cap is what keeps a swarm larger than the cap connected: if every joiner
took ``max_peers`` peers, the first ``max_peers + 1`` would fill each other up and later ones would find nobody
with room. A swarm of at most ``seek + 1`` peers is therefore fully known to everyone; a larger one is a
connected random graph where every peer knows between about ``seek`` and ``max_peers`` others, so memory and
discovery traffic grow with ``peers * max_peers``, not ``peers ** 2``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.transport.admission import Admission
from quinkgl_cli.transport.base import (
    DecodeSlot,
    ModelReceived,
    OutgoingUpdate,
    PeerInfo,
    TransportEvents,
    TransportStats,
)
from quinkgl_cli.transport.common import (
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_PEERS,
    PROTOCOL_VERSION,
    DropLog,
    OfferBook,
    RuledTransport,
    decode_body,
    digest,
)
from quinkgl_cli.transport.roomindex import RoomIndex

log = logging.getLogger("quinkgl.transport")



@dataclass
class _Offer:
    sender: str
    recipient: str
    round: int
    size: int
    digest: bytes
    nonce: int
    encoding: str
    sample_count: int
    meta: dict[str, Any]
    payload: bytes
    shared: DecodeSlot | None = None  # one for every offer of this ``payload`` object (`ModelReceived.shared`)


@dataclass
class _Faults:
    blocked: set[tuple[str, str]] = field(default_factory=set)
    corrupt: dict[tuple[str, str], int] = field(default_factory=dict)


class MemoryNetwork:
    """The hub: who is up, which deliveries are pending, and which faults apply."""

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        auto_deliver: bool = True,
        loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock or time.monotonic
        self.auto_deliver = auto_deliver
        self.loss = loss
        self._rng = random.Random(seed)
        # Introductions draw from their own stream: turning loss on must not change who knows whom.
        self._intro_rng = random.Random(f"introductions:{seed}")
        self._transports: dict[str, MemoryTransport] = {}
        # Who was introduced to whom and has not been lost since (the hellos may still be queued): the room a
        # transport has left is counted on this, so introductions made before a delivery respect the bounds too.
        self._links: dict[str, set[str]] = {}
        # node id -> the ids of the transports whose peer table holds it: who must hear that it left, without a
        # scan of the whole network at every stop (a swarm's end stopped every transport: O(N^2))
        self._known_by: dict[str, set[str]] = {}
        self._room: RoomIndex[MemoryTransport] = RoomIndex()  # who has room, in join order, without a scan
        self._queue: deque[Callable[[], None]] = deque()
        self._faults = _Faults()
        self._drain_loop: asyncio.AbstractEventLoop | None = None
        self._nonce = 0

    # -- driving -------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._queue)

    def deliver_all(self, limit: int | None = None) -> int:
        """Run queued deliveries, including those they cause, until none is left (or ``limit`` ran)."""
        done = 0
        while self._queue and (limit is None or done < limit):
            self._queue.popleft()()
            done += 1
        return done

    def deliver_pending(self) -> int:
        """Run only the deliveries queued before this call (one hop of every message in flight)."""
        return self.deliver_all(limit=len(self._queue))

    def _transfer(self, src: str, dst: str, size: int, action: Callable[[], None], round_: int | None = None) -> None:
        """Carry one message of ``size`` bytes (a model of ``round_``, or a control message) from ``src`` to ``dst``
        (``action`` delivers it): queued here; the simulator's field network (`quinkgl_cli.sim.fieldnet`) delays it
        by latency and bandwidth, or loses it."""
        self._enqueue(action)

    def _enqueue(self, action: Callable[[], None]) -> None:
        self._queue.append(action)
        if not self.auto_deliver:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._drain_loop is not loop:
            self._drain_loop = loop
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_loop = None
        while self._queue:
            action = self._queue.popleft()
            try:
                action()
            except Exception as exc:  # one handler's bug must not stop every later delivery; lockstep callers see it raised
                emit(log, logging.ERROR, "memory-delivery-failed", exc_info=exc)

    # -- fault injection -----------------------------------------------------------------------------------
    def block(self, src: str, dst: str, both_ways: bool = False) -> None:
        """Silently drop everything ``src`` sends to ``dst`` (a one-way link failure)."""
        self._faults.blocked.add((src, dst))
        if both_ways:
            self._faults.blocked.add((dst, src))

    def unblock(self, src: str, dst: str, both_ways: bool = False) -> None:
        self._faults.blocked.discard((src, dst))
        if both_ways:
            self._faults.blocked.discard((dst, src))

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut every link between the groups; peers across the cut are reported lost, as IPv8's silence timeout would."""
        a, b = list(group_a), list(group_b)
        for x in a:
            for y in b:
                self.block(x, y, both_ways=True)
                tx, ty = self._transports.get(x), self._transports.get(y)
                if tx and ty:
                    self._enqueue(functools.partial(tx._lose, y, True))
                    self._enqueue(functools.partial(ty._lose, x, True))

    def heal(self) -> None:
        """Remove every block; peers below their ``seek`` are introduced to peers they can see again."""
        self._faults.blocked.clear()
        for t in list(self._transports.values()):
            if t.running:
                self._fill(t)

    def corrupt(self, src: str, dst: str, count: int = 1) -> None:
        """Flip one byte in the next ``count`` model transfers from ``src`` to ``dst`` (the digest check catches it)."""
        self._faults.corrupt[(src, dst)] = self._faults.corrupt.get((src, dst), 0) + count

    def stop_all(self) -> None:
        """Stop every transport at once (a simulation's end). With nobody left running, no loss is reported to
        anyone: one pass, where stopping them one by one scans the network once per transport."""
        for t in self._transports.values():
            if t.running:
                t.running = False
                t._peers.clear()
                self._room.mark(t, False)
                emit(log, logging.DEBUG, "transport-stopped", context=t._context, kind="memory")
        self._links.clear()
        self._known_by.clear()
        self._queue.clear()

    def kill(self, node_id: str) -> None:
        """Stop ``node_id`` abruptly: no goodbye; its queued offers fail as 'sender vanished' at their recipients."""
        t = self._transports.get(node_id)
        if t is not None:
            t._halt(silent=True)

    # -- internals used by transports ----------------------------------------------------------------------
    def _link_ok(self, src: str, dst: str) -> bool:
        if (src, dst) in self._faults.blocked:
            return False
        return not (self.loss > 0 and self._rng.random() < self.loss)

    def _join(self, t: MemoryTransport) -> None:
        current = self._transports.get(t.node_id)
        if current is not None and current is not t and current.running:
            raise NetworkError(f"node id {t.node_id!r} is already running on this memory network")
        self._transports[t.node_id] = t
        self._links[t.node_id] = set()
        self._room.place(t)
        self._mark(t.node_id)
        self._fill(t)

    def _mark(self, node_id: str) -> None:
        """Tell the room index whether ``node_id`` may be introduced to one more peer."""
        t = self._transports.get(node_id)
        if t is not None:
            self._room.mark(t, t.running and len(self._links.get(node_id, ())) < t.max_peers)

    def _fill(self, t: MemoryTransport) -> None:
        """Introduce ``t`` to random peers of its swarm with room, until it has ``t.seek`` (IPv8's walk)."""
        mine = self._links.setdefault(t.node_id, set())
        need = t.seek - len(mine)
        if need <= 0 or not t.running:
            return
        if self.loss > 0 or self._faults.blocked:  # links are checked (and loss drawn) candidate by candidate
            candidates = [
                o for o in self._transports.values()
                if o is not t and o.running and o.swarm_id == t.swarm_id and o.node_id not in mine
                and len(self._links.get(o.node_id, ())) < o.max_peers
                and self._link_ok(t.node_id, o.node_id) and self._link_ok(o.node_id, t.node_id)
            ]
            if need < len(candidates):
                picked = set(self._intro_rng.sample(range(len(candidates)), need))
                candidates = [o for i, o in enumerate(candidates) if i in picked]  # join order: deterministic events
        else:  # the same picks from the room index, in O(need log n) instead of a scan of the network
            skip = sorted(self._room.slot[p] for p in (*mine, t.node_id) if self._room.has_room(p, t.swarm_id))
            total = self._room.count(t.swarm_id) - len(skip)
            ranks = range(total) if need >= total else sorted(self._intro_rng.sample(range(total), need))
            candidates = [self._room.select(t.swarm_id, k, skip) for k in ranks]
        for other in candidates:
            mine.add(other.node_id)
            self._links[other.node_id].add(t.node_id)
            self._mark(other.node_id)
            self._enqueue(functools.partial(t._hello_from, other))
            self._enqueue(functools.partial(other._hello_from, t))
        self._mark(t.node_id)

    def _unlink(self, a: str, b: str) -> None:
        self._links.get(a, set()).discard(b)
        self._links.get(b, set()).discard(a)
        self._mark(a)
        self._mark(b)

    def _leave(self, t: MemoryTransport, silent: bool = False) -> None:
        linked = self._links.pop(t.node_id, set())
        self._mark(t.node_id)
        for known in t._peers:
            self._known_by.get(known, set()).discard(t.node_id)
        # In join order, as a scan of the network would meet them: the losses are queued deterministically.
        for node_id in sorted(linked | self._known_by.get(t.node_id, set()), key=self._room.slot.__getitem__):
            other = self._transports[node_id]
            if other is not t and other.running and (other.node_id in linked or t.node_id in other._peers):
                self._links[other.node_id].discard(t.node_id)
                self._mark(other.node_id)
                self._enqueue(functools.partial(other._lose, t.node_id, silent))

    def _next_nonce(self) -> int:
        self._nonce += 1
        return self._nonce

    def _take_corruption(self, src: str, dst: str) -> bool:
        left = self._faults.corrupt.get((src, dst), 0)
        if left <= 0:
            return False
        self._faults.corrupt[(src, dst)] = left - 1
        return True


class MemoryTransport(RuledTransport):
    """One peer on a `MemoryNetwork`, with the same checks and events as the IPv8 transport."""

    def __init__(
        self,
        network: MemoryNetwork,
        node_id: str,
        swarm_id: str = "memory-swarm",
        arch_hash: str = "",
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        protocol_version: int = PROTOCOL_VERSION,
        max_peers: int = DEFAULT_MAX_PEERS,
        seek: int | None = None,
        admission: Admission | None = None,
        public_key: str | None = None,
    ) -> None:
        if not node_id:
            raise NetworkError("node id must not be empty")
        if max_peers < 1:
            raise NetworkError(f"max peers {max_peers} must be at least 1")
        seek = max(1, max_peers // 2) if seek is None else seek
        if not 1 <= seek <= max_peers:
            raise NetworkError(f"seek {seek} must be between 1 and max peers {max_peers}")
        self.network = network
        self.node_id = node_id
        self.swarm_id = swarm_id
        self.arch_hash = arch_hash
        self.max_model_bytes = max_model_bytes
        self.protocol_version = protocol_version
        self.max_peers = max_peers
        self.seek = seek
        # hex of the node's key; a test of a certified swarm gives real node keys, certified by ``admission``'s creator
        self.public_key = public_key or hashlib.sha256(f"memory-key:{node_id}".encode()).hexdigest()
        self.admission = admission
        self._last_digest: tuple[bytes, bytes] | None = None
        # The decode slot of ``_last_digest``'s payload, held weakly: it lives as long as an offer or a received
        # update holds it, so what a recipient decoded is freed with the last recipient's update, not kept until
        # this node's next send.
        self._last_slot: weakref.ref[DecodeSlot] | None = None
        self.stats = TransportStats()
        self._events: TransportEvents | None = None
        self.running = False
        self._peers: dict[str, PeerInfo] = {}
        self._cut: dict[str, None] = {}  # peers lost without a goodbye (a partition, a kill), in loss order
        self._book = OfferBook()
        self.drops = DropLog(self.stats, node_id)
        self._context = {"node": node_id}

    # -- Transport -----------------------------------------------------------------------------------------
    async def start(self, events: TransportEvents) -> None:
        self.start_sync(events)

    async def stop(self) -> None:
        self.stop_sync()

    def start_sync(self, events: TransportEvents) -> None:
        """`start` for a lockstep simulator that runs no event loop."""
        if self.running:
            raise NetworkError(f"transport {self.node_id} is already started")
        self._events = events
        self.running = True
        self.network._join(self)
        emit(log, logging.DEBUG, "transport-started", context=self._context, kind="memory", swarm=self.swarm_id)

    def stop_sync(self) -> None:
        if not self.running:
            return
        self._halt()
        emit(log, logging.DEBUG, "transport-stopped", context=self._context, kind="memory")

    def peers(self) -> list[PeerInfo]:
        return list(self._peers.values())

    def revoked(self) -> bool:
        return self.admission is not None and self.admission.revoked(bytes.fromhex(self.public_key))

    def knows(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def cut_off(self) -> list[str]:
        return list(self._cut)

    def rejoin(self) -> int:
        """The hub's walk again: peers it can see (no partition between) are introduced until ``seek``."""
        self.network._fill(self)
        return len(self._cut)

    def _offer(self, peer_id: str, update: OutgoingUpdate, meta: bytes) -> None:
        payload = bytes(update.payload)
        # One model goes to several peers as the same object: hash it once, as the IPv8 transport does.
        if self._last_digest is None or self._last_digest[0] is not payload:
            self._last_digest = (payload, digest(payload))
            self._last_slot = None
        slot = self._last_slot() if self._last_slot is not None else None
        if slot is None:
            slot = DecodeSlot()
            self._last_slot = weakref.ref(slot)
        offer = _Offer(
            sender=self.node_id,
            recipient=peer_id,
            round=update.round,
            size=len(payload),
            digest=self._last_digest[1],
            nonce=self.network._next_nonce(),
            encoding=update.encoding,
            sample_count=update.sample_count,
            meta=dict(update.meta),
            payload=payload,
            shared=slot,
        )
        if not self.network._link_ok(self.node_id, peer_id):
            return
        target = self.network._transports.get(peer_id)
        if target is not None:
            self.network._transfer(self.node_id, peer_id, offer.size, lambda: target._offer_from(self, offer),
                                   offer.round)

    def _deliver(self, peer_id: str, kind: str, data: bytes) -> None:
        if not self.network._link_ok(self.node_id, peer_id):
            return
        target = self.network._transports.get(peer_id)
        if target is not None:
            self.network._transfer(self.node_id, peer_id, len(data),
                                   lambda: target._message_from(self.node_id, kind, data))

    # -- receiving -----------------------------------------------------------------------------------------
    def _hello_from(self, other: MemoryTransport) -> None:
        if not self.running or not other.running:
            return
        if other.swarm_id != self.swarm_id:
            return  # another swarm's community: the two never see each other at all
        if other.protocol_version != self.protocol_version:
            self.drops.once("peer-refused", other.node_id, "protocol_mismatch", theirs=other.protocol_version)
            self.network._unlink(self.node_id, other.node_id)
            return
        if other.arch_hash != self.arch_hash:
            self.drops.once("peer-refused", other.node_id, "arch_mismatch", theirs=other.arch_hash)
            self.network._unlink(self.node_id, other.node_id)
            return
        if self.admission is not None:  # as the IPv8 transport: before the peer is known at all
            theirs = other.admission.certificate if other.admission is not None else b""
            refused = self.admission.refusal(other.node_id, bytes.fromhex(other.public_key), theirs)
            if refused is not None:
                self.drops.once("peer-refused", f"key:{other.public_key[-16:]}", refused, claims=other.node_id)
                self.network._unlink(self.node_id, other.node_id)
                return
        known = other.node_id in self._peers
        self._cut.pop(other.node_id, None)
        now = self.network.clock()
        info = PeerInfo(other.node_id, other.public_key, None, now)
        self._peers[other.node_id] = info
        self.network._known_by.setdefault(other.node_id, set()).add(self.node_id)
        if not known and self._events is not None:
            emit(log, logging.DEBUG, "peer-discovered", context=self._context, peer=other.node_id)
            self._events.on_peer_discovered(info)

    def _lose(self, peer_id: str, silent: bool = False) -> None:
        info = self._peers.pop(peer_id, None)
        if info is not None:
            self.network._known_by.get(peer_id, set()).discard(self.node_id)
        self._cut.pop(peer_id, None)
        if silent and info is not None:
            self._cut[peer_id] = None
        self._book.forget(peer_id)
        linked = peer_id in self.network._links.get(self.node_id, ())
        self.network._unlink(self.node_id, peer_id)
        if info is not None and self.running and self._events is not None:
            emit(log, logging.DEBUG, "peer-lost", context=self._context, peer=peer_id)
            self._events.on_peer_lost(info)
        if (info is not None or linked) and self.running:
            self.network._fill(self)  # the walk goes on: a lost peer's slot goes to another peer with room

    def _touch(self, peer_id: str) -> None:
        info = self._peers.get(peer_id)
        if info is not None:
            self._peers[peer_id] = PeerInfo(info.node_id, info.public_key, info.address, self.network.clock())

    def _offer_from(self, sender: MemoryTransport, offer: _Offer) -> None:
        if not self.running or offer.sender not in self._peers:
            return
        self._touch(offer.sender)
        if offer.size > self.max_model_bytes:
            self.drops("offer-refused", offer.sender, "oversized", size=offer.size, limit=self.max_model_bytes)
            return
        key = offer.round.to_bytes(8, "big", signed=True) + offer.digest + offer.nonce.to_bytes(8, "big")
        verdict = self._book.verdict(offer.sender, offer.round, key)
        if verdict is not None:
            emit(log, logging.DEBUG, "offer-ignored", context=self._context, peer=offer.sender, reason=verdict, offer_round=offer.round)
            return
        self._book.take(offer.sender, offer.round, key)
        if not sender.running:
            self.drops("fetch-failed", offer.sender, "sender_vanished")
            return
        payload = offer.payload
        if self.network._take_corruption(offer.sender, self.node_id):
            flipped = bytearray(payload)
            if flipped:
                flipped[len(flipped) // 2] ^= 0xFF
            payload = bytes(flipped) + (b"" if flipped else b"\0")
        # The sender hashed this very (immutable) object for its offer: hashing it again for each of its recipients
        # would find the same digest. Other bytes (a corrupted copy, another shard's) are hashed here.
        hashed = sender._last_digest
        known = hashed is not None and hashed[0] is payload and hashed[1] == offer.digest
        if len(payload) != offer.size or (not known and digest(payload) != offer.digest):
            self.drops("fetch-failed", offer.sender, "digest_mismatch", offer_round=offer.round)
            return
        sender.stats.bytes_sent += len(payload)
        sender.stats.models_sent += 1
        self.stats.bytes_received += len(payload)
        self.stats.models_received += 1
        update = ModelReceived(
            sender=offer.sender,
            round=offer.round,
            payload=payload,
            sample_count=offer.sample_count,
            encoding=offer.encoding,
            meta=offer.meta,
            received_at=self.network.clock(),
            digest=offer.digest,
            shared=offer.shared if payload is offer.payload else None,  # a corrupted copy decodes on its own
        )
        if self._events is not None:
            self._events.on_model(update)

    def _message_from(self, sender: str, kind: str, data: bytes) -> None:
        if not self.running or sender not in self._peers:
            return
        self._touch(sender)
        if self._events is not None:
            self._events.on_message(sender, kind, decode_body(data))

    def _halt(self, silent: bool = False) -> None:
        if not self.running:
            return
        self.running = False
        self.network._leave(self, silent)
        self._peers.clear()
