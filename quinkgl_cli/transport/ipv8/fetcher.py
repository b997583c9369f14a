"""Fetching the updates peers offer us: checks on the signed offer, the fetch queue, the TCP download, the digest.

Owns which offers were already taken (`OfferBook`), each sender's offer rate, the fetch queue and the slots that
bound concurrent downloads. Every bound holds whatever the sender does: offers beyond a sender's rate are
ignored, accepted fetches wait in a queue bounded per sender and overall (an offer that finds it full is
declined), a sender has one download running at a time, and a download that stops keeping pace is abandoned
(`stream.Progress`). A model reaches the node only when its bytes match the size and sha256 of the offer its
sender signed; its bytes travel encrypted (`channel`). When the sender's datagrams reach us directly, the UDP way
(`udpway`) joins the race of the TCP ways once they all had their start and none connected (`Fetcher._race`);
once it worked, it is tried first for that sender. A sender that answers a way busy (`busy`) is asked for the offer
again after its hint, a bounded number of times, holding no fetch slot meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ipv8.keyvault.crypto import default_eccrypto

from quinkgl_cli.events import emit
from quinkgl_cli.transport.base import ModelReceived, TransferDone, TransportStats
from quinkgl_cli.transport.common import MAX_ENCODING, MAX_META_BYTES, DropLog, OfferBook, decode_body, digest
from quinkgl_cli.transport.ipv8 import busy, channel, stream
from quinkgl_cli.transport.ipv8.busy import SenderBusy
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.links import STAGGER, Links, RouteFailed
from quinkgl_cli.transport.ipv8.outbox import HASH_IN_THREAD
from quinkgl_cli.transport.ipv8.paths import RELAY, UDP, Route, path_name
from quinkgl_cli.transport.ipv8.payloads import DeclinePayload, OfferPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.ratelimit import RateLimit
from quinkgl_cli.transport.ipv8.runtime import NodeEvents, TaskRegistry
from quinkgl_cli.transport.ipv8.server import close_socket
from quinkgl_cli.transport.ipv8.settings import TransportSettings
from quinkgl_cli.transport.ipv8.udpway import UdpWay

log = logging.getLogger("quinkgl.transport")


@dataclass(frozen=True)
class _Failure:
    """Why a way did not deliver, logged (``fetch-failed``) only when no other way did."""

    reason: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class _Busy:
    """The sender said it was too busy to serve the offer by that way: ask again in ``retry`` seconds."""

    retry: float


@dataclass(frozen=True)
class _Outcome:
    route: Route
    got: tuple[bytearray, bytes] | _Failure | _Busy
    seconds: float

    @property
    def ok(self) -> bool:
        return isinstance(self.got, tuple)

    @property
    def retry(self) -> float:
        """Seconds the sender asked us to wait before asking again (busy), else 0."""
        return self.got.retry if isinstance(self.got, _Busy) else 0.0


class Fetcher:
    def __init__(
        self,
        settings: TransportSettings,
        key: Any,
        community_id: bytes,
        courier: Courier,
        links: Links,
        udp: UdpWay,
        guard: DestinationGuard,
        pool: ThreadPoolExecutor,
        tasks: TaskRegistry,
        events: NodeEvents,
        drops: DropLog,
        stats: TransportStats,
        report: Callable[[TransferDone], None],
    ) -> None:
        self.settings = settings
        self.key = key
        self.my_mid = hashlib.sha1(key.pub().key_to_bin()).digest()
        self.community_id = community_id
        self.courier = courier
        self.links = links
        self.udp = udp
        self.guard = guard
        self.pool = pool
        self.tasks = tasks
        self.events = events
        self.drops = drops
        self.stats = stats
        self.report = report  # each transfer that ends (`Transport.report_transfer`)
        self.book = OfferBook()
        self.rate = RateLimit(settings.limits.offers_per_second, settings.limits.offer_burst)
        self.slots = asyncio.Semaphore(settings.max_concurrent_fetches)
        self.queued: dict[str, int] = {}  # sender -> fetches accepted and not finished (waiting or downloading)
        self._turns: dict[str, asyncio.Lock] = {}  # sender -> its one download at a time
        self.active = True  # False once the transport stops: a fetch that finishes late delivers nothing

    def forget(self, sender: str) -> None:
        """A lost peer that comes back starts afresh."""
        self.book.forget(sender)
        self.rate.forget(sender)
        self.links.forget(sender)

    def on_offer(self, rec: PeerRecord, p: OfferPayload) -> None:
        """A signed offer from a known peer (its freshness already checked): fetch it, or say why not."""
        s = self.settings
        if not self.rate.allow(rec.node_id, time.monotonic()):
            self.drops("offer-refused", rec.node_id, "rate_limited")
            return
        if p.swarm_id != s.swarm_id or p.sender != rec.claimed:
            self.drops("offer-refused", rec.node_id, "wrong_sender")
            return
        if p.recipient != s.node_id or p.recipient_mid != self.my_mid:
            self.drops("offer-refused", rec.node_id, "wrong_recipient")
            return
        if p.size > s.max_model_bytes:
            self.drops("offer-refused", rec.node_id, "oversized", size=p.size, limit=s.max_model_bytes)
            self.decline(rec, p.offer_id, "oversized")
            return
        try:
            meta = decode_body(p.meta, limit=MAX_META_BYTES)
            if not p.encoding or len(p.encoding) > MAX_ENCODING:
                raise ValueError("bad encoding name")
        except (ValueError, UnicodeDecodeError):
            self.drops("offer-refused", rec.node_id, "bad_meta")
            self.decline(rec, p.offer_id, "bad_meta")
            return
        verdict = self.book.verdict(rec.node_id, p.round, p.offer_id)
        if verdict is not None:
            emit(log, logging.DEBUG, "offer-ignored", context={"node": s.node_id}, peer=rec.node_id, reason=verdict,
                 offer_round=p.round)
            if verdict == "out_of_date":
                self.decline(rec, p.offer_id, verdict)
            return
        queued = self.queued.get(rec.node_id, 0)
        if queued >= s.limits.fetch_queue_per_peer or sum(self.queued.values()) >= s.limits.fetch_queue_total:
            self.drops("offer-refused", rec.node_id, "queue_full", queued=queued)
            self.decline(rec, p.offer_id, "busy")
            return
        self.book.take(rec.node_id, p.round, p.offer_id)
        self.queued[rec.node_id] = queued + 1
        self.tasks.spawn(self.fetch(rec, p, meta), f"fetch-{rec.node_id}")

    def decline(self, rec: PeerRecord, offer_id: bytes, reason: str) -> None:
        """Tell a sender we will not fetch its offer, so it frees the offer at once."""
        self.courier.send(rec.address, DeclinePayload(self.settings.swarm_id, *self.courier.stamp(), offer_id, reason))

    async def fetch(self, rec: PeerRecord, p: OfferPayload, meta: dict[str, Any]) -> None:
        """Download an accepted offer when the sender's turn and a slot come up; hand the model to the node."""
        try:
            got = await self._fetch_in_turn(rec, p, time.monotonic() + self.settings.offer_ttl)
        finally:
            left = self.queued.get(rec.node_id, 1) - 1
            if left > 0:
                self.queued[rec.node_id] = left
            else:
                self.queued.pop(rec.node_id, None)
                self._turns.pop(rec.node_id, None)
        if got is None:
            return
        buf, got_digest = got
        if got_digest != p.digest:
            self.drops("fetch-failed", rec.node_id, "digest_mismatch", offer_round=p.round)
            return
        if not self.active:
            return
        self.stats.models_received += 1
        self.stats.bytes_received += len(buf)
        rec.last_seen = time.monotonic()
        rec.delivered += 1
        self.events.model(ModelReceived(sender=rec.node_id, round=p.round, payload=buf, sample_count=p.sample_count,
                                        encoding=p.encoding, meta=meta, received_at=time.monotonic(),
                                        digest=bytes(p.digest)))

    async def _fetch_in_turn(self, rec: PeerRecord, p: OfferPayload, expires: float) -> tuple[bytearray, bytes] | None:
        """The offer's bytes, downloaded in the sender's turn; asked for again, after the sender's hint, each time it
        says it is busy (`busy`), ``busy.MAX_RETRIES`` times at most and not past ``expires`` (the offer's life)."""
        host = rec.address[0]
        if not self.guard.allows(host):
            self.guard.refuse(host, "tcp")
            return None
        # One download per sender at a time, its turn taken before a slot: a slow sender holds one slot at most (and
        # none while we wait to ask a busy one again).
        async with self._turns.setdefault(rec.node_id, asyncio.Lock()):
            asked = 0
            while True:
                async with self.slots:
                    got = await self._download(rec, p)
                if not isinstance(got, _Outcome):
                    return got
                asked += 1
                wait = busy.wait_before_asking(got.retry)
                if asked > busy.MAX_RETRIES or time.monotonic() + wait >= expires:
                    self.drops("fetch-failed", rec.node_id, "sender_busy", offer_round=p.round, asked=asked)
                    self.report(TransferDone("receive", rec.node_id, p.round, p.size, got.seconds,
                                             path_name(got.route.path), False))
                    return None
                await asyncio.sleep(wait)

    async def _download(self, rec: PeerRecord, p: OfferPayload) -> tuple[bytearray, bytes] | _Outcome | None:
        """The offered bytes and their sha256, or None with the failure reported, or the way the sender said it was
        busy on when no way delivered (nothing reported: it is asked again). The TCP routes to the sender are
        raced in `links`' order (`Links.connect_any`); UDP, when possible, joins the race ``STAGGER`` seconds after
        the last TCP route could have started, or at once when they all failed (`_race`); UDP alone when it is
        the way that worked last. A transfer that fails once connected (or once UDP was tried) is not tried again."""
        routes = self.links.routes(rec)
        if routes and routes[0].path == UDP:
            return self._settle(rec, p, [await self._by_udp(rec, p)])
        streams = [r for r in routes if r.path != UDP]
        connecting = time.monotonic()
        try:
            if not streams:
                raise RouteFailed("no_path")
            return self._settle(rec, p, await self._race(rec, p, streams, udp=len(streams) < len(routes)))
        except RouteFailed as exc:
            reason = exc.reason if len(routes) == 1 else "no_path"
            self.drops("fetch-failed", rec.node_id, reason, offer_round=p.round, tried=[str(r) for r in routes])
            if routes:  # the transfer never started: reported on the way tried first, its time the connecting
                self.report(TransferDone("receive", rec.node_id, p.round, p.size, time.monotonic() - connecting,
                                         path_name(routes[0].path), False))
            return None

    async def _race(self, rec: PeerRecord, p: OfferPayload, streams: list[Route], udp: bool) -> list[_Outcome]:
        """What the ways that ran came to: the one that delivered, alone, or else each one that failed or that the
        sender said it was busy on (`busy.SenderBusy`, as soon as it said so: the others run on); RouteFailed
        when no TCP route connected and UDP was not to be tried. A TCP route that connects before UDP starts has
        the transfer to itself. Once UDP started, a TCP route that connects later runs beside it: the sender serves
        an offer once, by whichever request reaches it first, and refuses the other (`server`, `udpway`); the first
        to deliver wins and the other is cancelled (its socket closed, its UDP transfer aborted)."""
        connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tcp = asyncio.ensure_future(self._by_stream(rec, p, streams, connected))
        ways = [tcp]
        outcomes: list[_Outcome] = []
        failed: RouteFailed | None = None
        try:
            if udp:
                first: list[asyncio.Future[Any]] = [tcp, connected]
                await asyncio.wait(first, timeout=len(streams) * STAGGER, return_when=asyncio.FIRST_COMPLETED)
                if not connected.done():
                    ways.append(asyncio.ensure_future(self._by_udp(rec, p)))
            pending = set(ways)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, RouteFailed):
                        failed = exc
                        continue
                    if isinstance(exc, SenderBusy):
                        outcomes.append(_Outcome(Route(exc.path), _Busy(exc.retry), 0.0))
                        continue
                    if exc is not None:
                        raise exc
                    outcome = task.result()
                    if outcome.ok:
                        return [outcome]
                    outcomes.append(outcome)
            if not outcomes:
                raise failed or RouteFailed("no_path")
            return outcomes
        finally:
            if not connected.done():
                connected.cancel()
            for task in ways:
                task.cancel()
            await asyncio.gather(*ways, return_exceptions=True)

    async def _by_stream(self, rec: PeerRecord, p: OfferPayload, streams: list[Route],
                         connected: asyncio.Future[None]) -> _Outcome:
        sock, route = await self.links.connect_any(rec, p, streams)
        if not connected.done():
            connected.set_result(None)
        started = time.monotonic()
        got = await self._exchange(rec, p, sock, route)
        return _Outcome(route, got, time.monotonic() - started)

    async def _by_udp(self, rec: PeerRecord, p: OfferPayload) -> _Outcome:
        started = time.monotonic()
        try:
            return _Outcome(Route(UDP), await self.udp.fetch(rec, p), time.monotonic() - started)
        except stream.FetchError as exc:
            return _Outcome(Route(UDP), _Failure(exc.reason, {"path": UDP}), time.monotonic() - started)
        except SenderBusy as exc:
            return _Outcome(Route(UDP), _Busy(exc.retry), time.monotonic() - started)

    def _settle(self, rec: PeerRecord, p: OfferPayload,
                outcomes: list[_Outcome]) -> tuple[bytearray, bytes] | _Outcome | None:
        """Remember and report what the race came to: the way that delivered, or else each way that failed (the
        last one reported as the transfer). A way that lost to another is neither remembered nor logged; nor is one
        the sender said it was busy on (it works): that one is returned, for the offer to be asked for again."""
        busy = [o for o in outcomes if isinstance(o.got, _Busy)]
        for outcome in outcomes:
            if isinstance(outcome.got, _Failure):
                self.drops("fetch-failed", rec.node_id, outcome.got.reason, offer_round=p.round, **outcome.got.fields)
            if not isinstance(outcome.got, _Busy):
                self.links.done(rec, outcome.route, outcome.ok, p.size, outcome.seconds)
        if busy:
            return max(busy, key=lambda o: o.retry)
        last = outcomes[-1]
        self.report(TransferDone("receive", rec.node_id, p.round, p.size, last.seconds, path_name(last.route.path), last.ok))
        return last.got if isinstance(last.got, tuple) else None

    async def _exchange(self, rec: PeerRecord, p: OfferPayload, sock: socket.socket, route: Route) -> tuple[bytearray, bytes] | _Failure | _Busy:
        """The fetch exchange on a connection to the sender (or to a relay joined to it); it closes ``sock``. BUSY
        (its serve slots full, or the offer on its way by another of our ways) counts as a busy reply (`busy`)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        # An overall budget besides the idle timeouts: a sender that trickles bytes must not hold a slot forever.
        # (loop.time() is time.monotonic(), the clock receive_blob reads.)
        started = loop.time()
        deadline = started + s.connect_timeout + s.fetch_timeout + p.size / s.limits.min_rate
        path = route.path
        try:
            async with asyncio.timeout_at(deadline):
                challenge = await stream.recv_exact(loop, sock, stream.CHALLENGE.size, s.connect_timeout)
                magic, version, nonce, theirs = stream.CHALLENGE.unpack(challenge)
                if magic != stream.CHALLENGE_MAGIC or version != stream.PROTOCOL:  # no cleartext fallback, ever
                    raise stream.FetchError("malformed_challenge" if magic != stream.CHALLENGE_MAGIC else "channel_version")
                ephemeral = channel.Ephemeral()
                statement = stream.fetch_statement(self.community_id, p.offer_id, nonce, rec.key_bin, theirs, ephemeral.public)
                signature = default_eccrypto.create_signature(self.key, statement)
                await loop.sock_sendall(sock, stream.REQUEST_HEAD.pack(stream.REQUEST_MAGIC, p.offer_id, ephemeral.public,
                                                                       len(signature)) + signature)
                status, size = stream.RESPONSE.unpack(await stream.recv_exact(loop, sock, stream.RESPONSE.size, s.fetch_timeout))
                if status == stream.BUSY:
                    emit(log, logging.INFO, "fetch-busy", context={"node": s.node_id}, peer=rec.node_id, path=path,
                         retry_ms=busy.RETRY_MS)
                    return _Busy(busy.RETRY_MS / 1000)
                if status != stream.OK:
                    raise stream.FetchError(f"refused_{stream.STATUS_REASONS.get(status, 'unknown')}")
                if size != p.size:
                    raise stream.FetchError("size_mismatch", f"offered {p.size}, sent {size}")
                opener = channel.Opener(ephemeral.derive(theirs, nonce, channel.context(self.community_id, p.offer_id, theirs,
                                                                                       ephemeral.public)))
                wire = channel.sealed_size(size)
                progress = stream.Progress(s.limits.stall_window, s.limits.stall_rate, wire, loop.time())
                if size > HASH_IN_THREAD:
                    return await loop.run_in_executor(self.pool, stream.receive_blob, sock, size, s.fetch_timeout, deadline,
                                                      opener, progress)
                sealed = bytearray(wire)
                await stream.recv_into(loop, sock, memoryview(sealed), s.fetch_timeout, progress)
                buf = opener.open_all(sealed, size)
                return buf, digest(buf)
        except channel.ChannelError as exc:
            return _Failure(exc.reason, {})
        except stream.FetchError as exc:
            reason = exc.reason
            if reason == "truncated":  # through a relay, either the relay or the sender went
                reason = "relay_or_sender_lost" if path == RELAY else "sender_vanished"
            return _Failure(reason, {"path": path})
        except TimeoutError:
            reason = "too_slow" if loop.time() >= deadline else "timeout"
            return _Failure(reason, {"budget_s": round(deadline - started, 1), "path": path})
        except OSError as exc:
            return _Failure("connection_refused" if isinstance(exc, ConnectionRefusedError) else "sender_vanished",
                            {"path": path})
        finally:
            close_socket(sock)
