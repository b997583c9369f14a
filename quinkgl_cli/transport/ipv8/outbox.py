"""Our offers: each update we announced to a peer and keep until it is fetched, declined or expires.

Owns the offers waiting to be served (bounded per recipient), their resends (an offer's datagram may be lost),
the digest cache that hashes a model going to several peers once, and what untrusted peers get (see `peers`):
only a few offers they leave unfetched, and, once there are more than `StrangerLimits.free` of them, offers at
``offer_rate`` per second among them all, each in turn (a crowd of fresh keys that fetch everything
cannot take our uploads from the peers we learn with).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from quinkgl_cli import validation
from quinkgl_cli.transport.common import DropLog, digest
from quinkgl_cli.transport.ipv8 import stream
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.payloads import OfferPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.settings import TransportSettings

HASH_IN_THREAD = 256 * 1024  # hashing more than this on the event loop would stall it noticeably
UNTRUSTED_RECOUNT = 0.25  # seconds a count of untrusted peers is reused: a round's offers go out within it


@dataclass
class Outgoing:
    offer_id: bytes
    recipient: str
    recipient_key: Any
    payload: bytes | bytearray | memoryview
    size: int
    fields: tuple[Any, ...]  # the offer's fields after session and counter: a resend is signed afresh
    address: tuple[str, int]
    created: float
    last_sent: float
    sends: int = 1
    serving: bool = False
    round: int = 0  # the update's round (also in ``fields``), for the transfer report


class DigestCache:
    """sha256 of recent payloads by identity: the same model object offered to several peers is hashed once."""

    def __init__(self, capacity: int = 4) -> None:
        self._entries: OrderedDict[int, tuple[object, asyncio.Future[bytes]]] = OrderedDict()
        self._capacity = capacity

    async def digest(self, payload: bytes | bytearray | memoryview) -> bytes:
        key = id(payload)
        cached = self._entries.get(key)
        if cached is not None and cached[0] is payload:
            return await asyncio.shield(cached[1])
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._entries[key] = (payload, fut)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        try:
            value = await asyncio.to_thread(digest, payload) if len(payload) > HASH_IN_THREAD else digest(payload)
        except BaseException as exc:
            self._entries.pop(key, None)
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: a waiter that was cancelled must not leave it unobserved
            raise
        fut.set_result(value)
        return value


class Outbox:
    def __init__(self, settings: TransportSettings, table: PeerTable, courier: Courier, drops: DropLog, tcp_port: int) -> None:
        self.settings = settings
        self.table = table
        self.courier = courier
        self.drops = drops
        self.tcp_port = tcp_port
        self.digests = DigestCache()
        self.offers: dict[bytes, Outgoing] = {}
        self._untrusted = (float("-inf"), 0)  # (when counted, how many): counted at most every UNTRUSTED_RECOUNT s

    def refusal(self, rec: PeerRecord, now: float) -> str | None:
        """Why ``rec`` may not get another offer now, or None: a trusted peer always may; an untrusted one not once
        several of our offers to it went unfetched (expired, declined, or pushed out by newer ones), nor sooner
        than its turn when many untrusted peers share the budget."""
        if rec.trusted:
            return None
        limits = self.settings.limits.strangers
        if rec.unanswered >= limits.probation_offers:
            return "unproven"
        counted_at, untrusted = self._untrusted
        if now - counted_at >= UNTRUSTED_RECOUNT:
            untrusted = self.table.untrusted()
            self._untrusted = (now, untrusted)
        if now - rec.last_offer < max(0, untrusted - limits.free) / limits.offer_rate:
            return "untrusted_budget"
        return None

    def _unfetched(self, out: Outgoing) -> None:
        rec = self.table.get(out.recipient)
        if rec is not None and rec.public_key is out.recipient_key and not rec.trusted:
            rec.unanswered += 1

    async def offer(self, rec: PeerRecord, round_: int, payload: bytes | bytearray | memoryview, encoding: str,
                    sample_count: int, meta: bytes) -> None:
        dig = await self.digests.digest(payload)
        if self.table.get(rec.node_id) is not rec:
            return  # lost (or restarted) while we hashed
        now = time.monotonic()
        offer_id = os.urandom(stream.OFFER_ID_BYTES)
        fields = (offer_id, round_, self.settings.node_id, rec.claimed, rec.mid, len(payload), dig, encoding,
                  sample_count, meta, self.tcp_port)
        self.offers[offer_id] = Outgoing(offer_id, rec.node_id, rec.public_key, payload, len(payload), fields, rec.address, now, now,
                                         round=round_)
        pending = [o for o in self.offers.values() if o.recipient == rec.node_id and not o.serving]
        for stale in pending[: -self.settings.limits.pending_offers_per_peer]:
            del self.offers[stale.offer_id]  # a peer that never fetches must not pin every update we ever offered it
            self._unfetched(stale)
        self.courier.send(rec.address, OfferPayload(self.settings.swarm_id, *self.courier.stamp(), *fields))

    def awaited(self) -> bool:
        """Whether a peer still in the table has an offer of ours it has not finished fetching."""
        return any(self.table.get(out.recipient) is not None for out in self.offers.values())

    def served(self, out: Outgoing) -> None:
        """``out`` went to its recipient in full: the offer is done, and the recipient has proved itself."""
        self.offers.pop(out.offer_id, None)
        rec = self.table.get(out.recipient)
        if rec is not None and rec.public_key is out.recipient_key:  # the same run of that peer
            rec.fetched += 1

    def tick(self, now: float) -> None:
        """Expire offers nobody fetched; send again those whose datagram may have been lost."""
        limits = self.settings.limits
        for oid, out in list(self.offers.items()):
            if now - out.created > self.settings.offer_ttl:
                del self.offers[oid]
                if not out.serving:
                    self.drops("offer-expired", out.recipient, "not_fetched")
                    self._unfetched(out)
            elif not out.serving and out.sends < limits.offer_resends and now - out.last_sent > limits.offer_resend_after:
                rec = self.table.get(out.recipient)
                if rec is not None:  # the receiver dedupes by offer id
                    out.sends += 1
                    out.last_sent = now
                    self.courier.send(rec.address, OfferPayload(self.settings.swarm_id, *self.courier.stamp(), *out.fields))

    def on_decline(self, rec: PeerRecord, offer_id: bytes, reason: str) -> None:
        out = self.offers.get(offer_id)
        if out is None or out.recipient != rec.node_id or out.serving:
            return
        del self.offers[offer_id]
        self._unfetched(out)
        self.drops("offer-declined", rec.node_id, reason[:64] if validation.is_node_id(reason[:64]) else "unspecified")
