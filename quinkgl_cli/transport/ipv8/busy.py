"""A sender's "busy, ask again in N ms": both ends of the `BusyPayload` reply.

A sender whose UDP sends (`udpway.SENDS`) or serve slots (`links`) are full refuses a request for one of its
offers (a `UdpPullPayload`, a `PathRequestPayload`) with a signed `BusyPayload` naming the offer, the way asked
for and when to ask again, instead of dropping it without a word, after which the recipient could not tell a busy
sender from a way that does not work: it waited out its connect timeout and marked the way failed. Replies are
rate-limited per requester (``REPLIES_PER_SECOND``, bursts of ``REPLY_BURST``): each answers a signed, replay-checked
request of the requester's own, one datagram for one, and the bucket bounds even that.

On the recipient's side a reply counts only while we wait for that sender's answer on that way for that offer
(`watch`), and only from the key that signed the offer's sender's hellos (the membership's check): anything else
is refused (``busy-refused``) and changes nothing (a reply to a repeated request, for an attempt a first reply
ended lately, is dropped quietly). An accepted one ends that way's attempt at once
(`SenderBusy`), logged as ``fetch-busy``, without the way being remembered as failed: it worked, the sender was
busy. The hint is clamped to ``MIN_RETRY``-``MAX_RETRY`` seconds, and the fetcher asks again at most
``MAX_RETRIES`` times per offer within its life (`fetcher.Fetcher`): a peer answering busy to everything costs us a
few short waits per offer, never a storm. The wait is the hint plus up to ``JITTER`` of it at random
(`wait_before_asking`): the recipients a sender turned away in one burst (every peer that got its offer in one
round) would otherwise all ask again in the same instant and find it busy again. A peer of a version without this message drops it as an unknown message
(IPv8's dispatch has no handler for its id) and leaves the request unanswered, as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from quinkgl_cli.events import emit
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.payloads import BusyPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.ratelimit import RateLimit
from quinkgl_cli.transport.ipv8.settings import TransportSettings

log = logging.getLogger("quinkgl.transport")
RETRY_MS = 1000  # what a busy sender tells: about the time a UDP send or a TCP serve of a 10 MB model takes
MIN_RETRY = 0.2  # seconds: a hint below this is taken as this (a sender cannot make us hammer it)
MAX_RETRY = 5.0  # nor make an offer wait past this at a time
MAX_RETRIES = 3  # busy replies an offer is asked again after; the next one ends its fetch
REPLIES_PER_SECOND = 1.0
REPLY_BURST = 3
JITTER = 0.5  # share of the hint added at most, drawn per wait
ENDED_KEPT = 64  # attempts remembered once ended, so that a late reply to a repeated request is no refusal
T = TypeVar("T")
_draw = random.Random()


def wait_before_asking(retry: float) -> float:
    """Seconds to wait before asking a busy sender again: its (clamped) hint, spread by up to ``JITTER`` of it."""
    return retry * (1 + JITTER * _draw.random())


class SenderBusy(Exception):
    """The sender answered a way's request with busy: ask again in ``retry`` seconds (clamped)."""

    def __init__(self, path: str, retry: float) -> None:
        super().__init__(path)
        self.path = path
        self.retry = retry


class BusyReplies:
    def __init__(self, settings: TransportSettings, courier: Courier, drops: DropLog) -> None:
        self.settings = settings
        self.courier = courier
        self.drops = drops
        self._rate = RateLimit(REPLIES_PER_SECOND, REPLY_BURST)
        # (offer id, way) -> (the sender's node id, its key, told when it says busy) while we wait for its answer
        self._waiting: dict[tuple[bytes, str], tuple[str, bytes, asyncio.Future[float]]] = {}
        self._ended: OrderedDict[tuple[bytes, str], None] = OrderedDict()  # attempts that ended lately
        self.sent = 0

    # -- sender side -----------------------------------------------------------------------------------------
    def reply(self, rec: PeerRecord, offer_id: bytes, path: str) -> None:
        """Tell ``rec`` we are too busy to serve ``offer_id`` by ``path`` now, within its reply budget."""
        if not self._rate.allow(rec.node_id, time.monotonic()):
            return
        self.sent += 1
        self.courier.send(rec.address, BusyPayload(self.settings.swarm_id, *self.courier.stamp(), offer_id, path,
                                                   RETRY_MS))

    def forget(self, node_id: str) -> None:
        self._rate.forget(node_id)

    # -- recipient side --------------------------------------------------------------------------------------
    @contextmanager
    def watch(self, rec: PeerRecord, offer_id: bytes, path: str) -> Iterator[asyncio.Future[float]]:
        """While in it, a busy reply from ``rec`` for ``offer_id`` by ``path`` sets the future (seconds to wait)."""
        told: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        key = (offer_id, path)
        self._waiting[key] = (rec.node_id, rec.key_bin, told)
        try:
            yield told
        finally:
            if self._waiting.get(key, (None, None, None))[2] is told:
                del self._waiting[key]
            if not told.done():
                told.cancel()
            self._ended[key] = None
            self._ended.move_to_end(key)
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    def on_busy(self, rec: PeerRecord, p: BusyPayload) -> None:
        """A signed busy reply from ``rec`` (its freshness already checked): end the way's attempt if it holds."""
        attempt = (p.offer_id, p.path)
        waiting = self._waiting.get(attempt)
        if waiting is None and attempt in self._ended or waiting is not None and waiting[2].done():
            return  # a repeated request's reply, after the first ended the attempt: dropped without a word
        if p.swarm_id != self.settings.swarm_id or waiting is None:
            self.drops("busy-refused", rec.node_id, "unknown_offer")
            return
        node_id, key_bin, told = waiting
        if rec.node_id != node_id or rec.key_bin != key_bin:
            self.drops("busy-refused", rec.node_id, "not_sender")
            return
        retry = min(MAX_RETRY, max(MIN_RETRY, p.retry_ms / 1000))
        emit(log, logging.INFO, "fetch-busy", context={"node": self.settings.node_id}, peer=rec.node_id, path=p.path,
             retry_ms=round(retry * 1000))
        told.set_result(retry)

    async def unless_busy(self, rec: PeerRecord, offer_id: bytes, path: str, work: Coroutine[Any, Any, T]) -> T:
        """What ``work`` (asking ``rec`` for ``offer_id`` by ``path``) comes to, unless ``rec`` says it is busy
        first: then ``work`` is cancelled and SenderBusy raised."""
        with self.watch(rec, offer_id, path) as told:
            task = asyncio.ensure_future(work)
            either: list[asyncio.Future[Any]] = [task, told]
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                raise SenderBusy(path, told.result())
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
