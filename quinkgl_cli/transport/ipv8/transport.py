"""The daemon's transport: an IPv8 community per swarm for discovery and signed control traffic, TCP for model bytes.

Lifecycle: construct anywhere, ``await start(events)`` inside the running loop (IPv8 objects are built there),
``await stop()`` on the same loop. Event callbacks run on that loop and must not block it; training belongs in a
worker thread, or peers stop hearing our heartbeats and report us lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipv8.keyvault.crypto import default_eccrypto
from ipv8.messaging.interfaces.lan_addresses.interfaces import get_providers
from ipv8.peer import Peer
from ipv8.peerdiscovery.discovery import RandomWalk
from ipv8.peerdiscovery.network import Network

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.base import (
    ControlValue,
    ModelReceived,
    OutgoingUpdate,
    PeerInfo,
    Transport,
    TransportEvents,
    TransportStats,
)
from quinkgl_cli.transport.common import (
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    OfferBook,
    OnceLog,
    check_kind,
    decode_body,
    digest,
    encode_body,
)
from quinkgl_cli.transport.ipv8 import stream
from quinkgl_cli.transport.ipv8.community import LOGGER_NAME, SwarmCommunity, SwarmSettings, community_class
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard, GuardedUDPEndpoint, is_loopback
from quinkgl_cli.transport.ipv8.identity import load_or_create_key, next_session
from quinkgl_cli.transport.ipv8.payloads import (
    ByePayload,
    ControlPayload,
    DeclinePayload,
    HelloHead,
    HelloPayload,
    OfferPayload,
)
from quinkgl_cli.transport.ipv8.replay import ReplayGuard

log = logging.getLogger("quinkgl.transport")

DEFAULT_MAX_MODEL_BYTES = 1024**3
MAX_NODE_ID = 128
MAX_ENCODING = 64
HASH_IN_THREAD = 256 * 1024  # hashing more than this would stall the event loop noticeably
MIN_RATE = 1024 * 1024  # bytes/s a transfer may drop to before it is abandoned (beyond the idle timeout)
OFFER_RESENDS = 3
OFFER_RESEND_AFTER = 1.5  # seconds without a fetch before an offer is sent again (its datagram may have been lost)
MAX_PENDING_PER_PEER = 8
SERVE_SLOTS = 16
_IPV8_LOGGERS = (
    "ipv8",
    LOGGER_NAME,
    "TaskManager",
    "RandomWalk",
    "UDPEndpoint",
    "GuardedUDPEndpoint",
    "Network",
    "DispersyBootstrapper",
    "UDPBroadcastBootstrapper",
    "BroadcastBootstrapEndpoint",
)


def parse_address(value: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port`` (or a tuple) to a tuple; raises NetworkError with what is wrong."""
    if isinstance(value, tuple):
        host, port = value
    else:
        host, sep, port_text = str(value).strip().rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise NetworkError(f"bootstrap peer {value!r} is not host:port", "e.g. --bootstrap-peer 127.0.0.1:7001")
        port = int(port_text)
        host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise NetworkError(f"bootstrap peer {value!r} has port {port} outside 1-65535")
    return str(host), int(port)


def _quiet_ipv8_logging() -> None:
    """IPv8 logs malformed packets with whole payloads and tracebacks: keep only its warnings and worse."""
    for name in _IPV8_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


@dataclass
class _Peer:
    node_id: str
    key_bin: bytes
    mid: bytes
    address: tuple[str, int]
    tcp_port: int
    last_seen: float
    session: int
    public_key: Any = None

    def info(self) -> PeerInfo:
        return PeerInfo(self.node_id, self.key_bin.hex(), self.address, self.last_seen)


@dataclass
class _Outgoing:
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


@dataclass
class _DigestCache:
    entries: OrderedDict[int, tuple[object, asyncio.Future[bytes]]] = field(default_factory=OrderedDict)


class IPv8Transport(Transport):
    def __init__(
        self,
        node_id: str,
        swarm_id: str,
        arch_hash: str,
        state_dir: Path | str,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Sequence[str | tuple[str, int]] = (),
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        enable_public_bootstrap: bool = False,
        enable_lan_discovery: bool = False,
        walk_interval: float = 0.5,
        heartbeat_interval: float = 2.0,
        silence_timeout: float = 12.0,
        connect_timeout: float = 3.0,
        fetch_timeout: float = 10.0,
        offer_ttl: float = 60.0,
        max_peers: int = 256,
        max_concurrent_fetches: int = 4,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        if not node_id or len(node_id) > MAX_NODE_ID or any(c.isspace() or c == "=" for c in node_id):
            raise NetworkError(f"node id {node_id!r} is invalid", f"use 1-{MAX_NODE_ID} characters without spaces or '='")
        try:
            ipaddress.ip_address(listen_host)
        except ValueError as exc:
            raise NetworkError(f"listen address {listen_host!r} is not an IP address", "e.g. --listen 127.0.0.1 or 0.0.0.0") from exc
        if ipaddress.ip_address(listen_host).version != 4:
            raise NetworkError(f"listen address {listen_host!r} is not IPv4", "IPv6 is not supported yet")
        if not 0 <= port < 65536:
            raise NetworkError(f"port {port} is outside 0-65535")
        if max_model_bytes <= 0:
            raise NetworkError("max model bytes must be positive")
        self.node_id = node_id
        self.swarm_id = swarm_id
        self.arch_hash = arch_hash
        self.state_dir = Path(state_dir)
        self.listen_host = listen_host
        self.requested_port = port
        self.bootstrap = [parse_address(b) for b in bootstrap]
        self.max_model_bytes = max_model_bytes
        self.enable_public_bootstrap = enable_public_bootstrap
        self.enable_lan_discovery = enable_lan_discovery
        self.walk_interval = walk_interval
        self.heartbeat_interval = heartbeat_interval
        self.silence_timeout = silence_timeout
        self.connect_timeout = connect_timeout
        self.fetch_timeout = fetch_timeout
        self.offer_ttl = offer_ttl
        self.max_peers = max_peers
        self.max_concurrent_fetches = max_concurrent_fetches
        self.protocol_version = protocol_version
        self.stats = TransportStats()
        self.guard = DestinationGuard(listen_host)
        if (enable_lan_discovery or enable_public_bootstrap) and self.guard.loopback_only:
            raise NetworkError(
                "LAN discovery and public bootstrap servers need a non-loopback listen address",
                "add --listen 0.0.0.0 (or this host's LAN address)",
            )
        for host, bport in self.bootstrap:
            if self.guard.loopback_only and not is_loopback(host):
                raise NetworkError(
                    f"bootstrap peer {host}:{bport} is not on loopback, but this node listens on {listen_host}",
                    "listen on a reachable address, e.g. --listen 0.0.0.0",
                )
        self._once = OnceLog(log)
        self._book = OfferBook()
        self._events: TransportEvents | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._key: Any = None
        self._endpoint: GuardedUDPEndpoint | None = None
        self._community: SwarmCommunity | None = None
        self._walker: RandomWalk | None = None
        self._lsock: socket.socket | None = None
        self.tcp_port = 0
        self._peers: dict[str, _Peer] = {}
        self._node_by_key: dict[bytes, str] = {}
        self._hello_sent: dict[bytes, float] = {}
        self._seed_walked: dict[tuple[str, int], float] = {}
        self._outgoing: dict[bytes, _Outgoing] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._digests = _DigestCache()
        self._fetch_slots: asyncio.Semaphore | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._serve_slots: asyncio.Semaphore | None = None
        self._resolved_seeds: list[tuple[str, int]] = []
        self._replay = ReplayGuard()
        self._session = 0  # set by start(): larger on every start of this identity
        self._counter = 0

    # -- identity and addresses ------------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._endpoint is None:
            raise NetworkError("transport is not started")
        host, port = self._endpoint.get_address()[:2]
        return str(host), int(port)

    @property
    def public_key(self) -> str:
        return self._key.pub().key_to_bin().hex() if self._key is not None else ""

    @property
    def community_id(self) -> bytes:
        if self._community is None:
            raise NetworkError("transport is not started")
        return self._community.community_id

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self, events: TransportEvents) -> None:
        if self._running:
            raise NetworkError(f"transport {self.node_id} is already started")
        self._loop = asyncio.get_running_loop()
        self._events = events
        _quiet_ipv8_logging()
        if not self.enable_lan_discovery:
            get_providers().clear()  # nothing in this process may go looking for the host's LAN addresses
        self._key = load_or_create_key(self.state_dir)
        self._session = next_session(self.state_dir)
        self._fetch_slots = asyncio.Semaphore(self.max_concurrent_fetches)
        self._serve_slots = asyncio.Semaphore(SERVE_SLOTS)
        self._pool = ThreadPoolExecutor(max_workers=SERVE_SLOTS + self.max_concurrent_fetches, thread_name_prefix="quinkgl-transfer")
        endpoint = GuardedUDPEndpoint(self.listen_host, self.requested_port, self.guard)
        endpoint.on_foreign = self._foreign_packet
        await endpoint.open()
        self._endpoint = endpoint
        try:
            udp_port = self.address[1]
            self._lsock = self._listen_tcp(udp_port)
            self.tcp_port = self._lsock.getsockname()[1]
            cls = community_class(self.swarm_id)
            settings = SwarmSettings(
                my_peer=Peer(self._key),
                endpoint=endpoint,
                network=Network(),
                max_peers=self.max_peers,
                owner=self,
                lan_discovery=self.enable_lan_discovery,
                bound=(self.listen_host, udp_port),
            )
            community = cls(settings)
            if community.community_id != cls.community_id or community.get_prefix()[2:] != cls.community_id:
                raise NetworkError("IPv8 community id did not take", "pyipv8 changed: check the pinned version")
            self._community = community
            self._add_bootstrappers(community)
            self._walker = RandomWalk(community, timeout=3.0, window_size=5, reset_chance=30)
            self._resolved_seeds = await self._resolve_seeds()
        except BaseException:
            await self._teardown()
            raise
        self._running = True
        self._spawn(self._accept_loop(), "accept")
        self._spawn(self._tick_loop(), "tick")
        log.info(
            "transport-started node=%s kind=ipv8 swarm=%s udp=%s:%d tcp=%d key=%s bootstrap=%d lan_discovery=%s public_bootstrap=%s",
            self.node_id,
            self.swarm_id,
            self.listen_host,
            udp_port,
            self.tcp_port,
            self.public_key[-16:],
            len(self.bootstrap),
            self.enable_lan_discovery,
            self.enable_public_bootstrap,
        )

    async def stop(self) -> None:
        if not self._running:
            await self._teardown()
            return
        self._running = False
        if self._community is not None:
            for peer in list(self._peers.values()):
                self._send(peer.address, ByePayload(self.swarm_id, *self._stamp(), self.node_id))
        await self._teardown()
        log.info("transport-stopped node=%s kind=ipv8 blocked_sends=%d", self.node_id, self.guard.blocked)

    async def _teardown(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._tasks.clear()
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        if self._community is not None:
            await self._community.unload()
            self._community = None
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
            await asyncio.sleep(0)  # the datagram transport releases its socket on the next loop pass
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._peers.clear()
        self._node_by_key.clear()
        self._outgoing.clear()

    def _listen_tcp(self, udp_port: int) -> socket.socket:
        """TCP on the UDP port number when one was asked for (one --port to open in a firewall), else any free one."""
        candidates = [udp_port] if self.requested_port else [udp_port, 0]
        last: OSError | None = None
        for tcp_port in candidates:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.listen_host, tcp_port))
                sock.listen(64)
                sock.setblocking(False)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise NetworkError(
            f"cannot bind TCP {self.listen_host}:{udp_port}: {last.strerror if last else 'unknown error'}",
            "choose another --port",
        )

    def _add_bootstrappers(self, community: SwarmCommunity) -> None:
        if self.enable_public_bootstrap:
            from ipv8.bootstrapping.dispersy.bootstrapper import DispersyBootstrapper
            from ipv8.configuration import DISPERSY_BOOTSTRAPPER

            community.bootstrappers.append(DispersyBootstrapper(**DISPERSY_BOOTSTRAPPER["init"]))
        if self.enable_lan_discovery:
            from ipv8.bootstrapping.udpbroadcast.bootstrapper import UDPBroadcastBootstrapper

            community.bootstrappers.append(UDPBroadcastBootstrapper())

    async def _resolve_seeds(self) -> list[tuple[str, int]]:
        assert self._loop is not None
        out: list[tuple[str, int]] = []
        for host, port in self.bootstrap:
            try:
                ipaddress.ip_address(host)
                out.append((host, port))
                continue
            except ValueError:
                pass
            try:
                infos = await asyncio.wait_for(self._loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), 5.0)
            except (OSError, TimeoutError) as exc:
                raise NetworkError(f"cannot resolve bootstrap peer {host}:{port}: {exc}", "check the name or give an IP address") from exc
            for info in infos[:1]:
                resolved = str(info[4][0]), int(info[4][1])
                if not self.guard.allows(resolved[0]):
                    raise NetworkError(f"bootstrap peer {host} resolves to {resolved[0]}, not allowed from {self.listen_host}")
                out.append(resolved)
        own = (self.listen_host, self.address[1])
        return [s for s in out if s != own]

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=f"quinkgl-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("transport-task-failed node=%s task=%s error=%r", self.node_id, task.get_name(), exc, exc_info=exc)

    # -- periodic work ---------------------------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while self._running:
            try:
                self._tick()
            except Exception as exc:  # a periodic body that raises would end discovery silently: log and go on
                # once per exception type with its traceback, then at DEBUG: the same bug must not log every tick
                self._once("transport-tick-failed", "-", type(exc).__name__, node=self.node_id, level=logging.ERROR, exc_info=exc, error=str(exc)[:200])
            await asyncio.sleep(self.walk_interval)

    def _tick(self) -> None:
        community, walker = self._community, self._walker
        if community is None or walker is None:
            return
        now = time.monotonic()
        known_addresses = {p.address for p in self._peers.values()}
        for seed in self._resolved_seeds:
            if seed not in known_addresses and now - self._seed_walked.get(seed, 0.0) >= max(1.0, self.walk_interval):
                self._seed_walked[seed] = now
                community.walk_to(seed)
        if community.bootstrappers and not community.get_peers():
            community.bootstrap()
        walker.take_step()
        for peer in community.get_peers():
            key = peer.public_key.key_to_bin()
            if key not in self._node_by_key:
                self._maybe_hello(key, _addr(peer.address), want_reply=True, min_gap=2.0)
        for rec in list(self._peers.values()):
            if now - rec.last_seen > self.silence_timeout:
                self._lose(rec.node_id, "silence")
            elif now - self._hello_sent.get(rec.key_bin, 0.0) >= self.heartbeat_interval:
                self._maybe_hello(rec.key_bin, rec.address, want_reply=False, min_gap=0.0)
        for oid, out in list(self._outgoing.items()):
            if now - out.created > self.offer_ttl:
                del self._outgoing[oid]
                if not out.serving:
                    self._drop("offer-expired", out.recipient, "not_fetched")
            elif not out.serving and out.sends < OFFER_RESENDS and now - out.last_sent > OFFER_RESEND_AFTER:
                rec = self._peers.get(out.recipient)
                if rec is not None:  # a lost datagram must not lose the update: the receiver dedupes by offer id
                    out.sends += 1
                    out.last_sent = now
                    self._send(rec.address, OfferPayload(self.swarm_id, *self._stamp(), *out.fields))

    def _maybe_hello(self, key: bytes, address: tuple[str, int], want_reply: bool, min_gap: float) -> None:
        now = time.monotonic()
        if now - self._hello_sent.get(key, 0.0) < min_gap:
            return
        self._hello_sent[key] = now
        hello = HelloPayload(self.swarm_id, self.node_id, self.arch_hash, self.protocol_version, *self._stamp(), self.tcp_port, want_reply)
        self._send(address, hello)

    def _stamp(self) -> tuple[int, int]:
        """Session and counter for the next signed message: no two messages of one run carry the same pair."""
        self._counter += 1
        return self._session, self._counter

    def _send(self, address: tuple[str, int], payload: Any) -> None:
        if self._community is not None and self._endpoint is not None and self._endpoint.is_open():
            self._community.send_signed(address, payload)

    # -- discovery -------------------------------------------------------------------------------------------------
    def _on_contact(self, peer: Any) -> None:
        key = peer.public_key.key_to_bin()
        if key not in self._node_by_key:
            self._maybe_hello(key, _addr(peer.address), want_reply=True, min_gap=1.0)

    def _on_other_protocol(self, key: bytes, source: tuple[str, int], head: HelloHead) -> None:
        if self._running:
            self._drop("peer-refused", _label(head.node_id, source), "protocol_mismatch", theirs=head.protocol, ours=self.protocol_version)

    def _on_hello(self, key: bytes, source: tuple[str, int], p: HelloPayload) -> None:
        if not self._running:
            return
        node_id = p.node_id
        label = _label(node_id, source)
        if not _valid_node_id(node_id):
            self._drop("peer-refused", label, "bad_node_id")
            return
        if p.swarm_id != self.swarm_id:
            self._drop("peer-refused", label, "swarm_mismatch", theirs=p.swarm_id[:80])
            return
        if p.arch_hash != self.arch_hash:
            self._drop("peer-refused", label, "arch_mismatch", theirs=p.arch_hash[:80], ours=self.arch_hash)
            return
        if node_id == self.node_id:
            self._drop("peer-refused", label, "node_id_taken", detail="same as ours")
            return
        holder = self._peers.get(node_id)
        if holder is None and len(self._peers) >= self.max_peers:
            self._drop("peer-refused", label, "peer_limit", limit=self.max_peers)
            return
        if holder is not None and holder.key_bin != key:
            self._drop("peer-refused", label, "node_id_taken", holder=holder.key_bin.hex()[-16:])
            return
        if not self._admit(key, p.session, p.counter, "peer-refused", label, source):
            return  # a captured hello sent again: it must not move the peer's address or restart it
        previous = self._node_by_key.get(key)
        if previous is not None and previous != node_id:
            self._lose(previous, "renamed")
        if holder is not None and holder.session != p.session:
            self._lose(node_id, "restarted")
            holder = None
        now = time.monotonic()
        if holder is None:
            rec = _Peer(node_id, key, hashlib.sha1(key).digest(), source, p.tcp_port, now, p.session, default_eccrypto.key_from_public_bin(key))
            self._peers[node_id] = rec
            self._node_by_key[key] = node_id
            log.debug("peer-discovered peer=%s address=%s:%d key=%s", node_id, source[0], source[1], key.hex()[-16:])
            self._emit("on_peer_discovered", rec.info())
        else:
            holder.address = source
            holder.tcp_port = p.tcp_port
            holder.last_seen = now
        if p.want_reply or holder is None:  # first sight: tell the peer our session before it sends us anything
            self._maybe_hello(key, source, want_reply=False, min_gap=0.0)

    def _on_bye(self, key: bytes, source: tuple[str, int], p: ByePayload) -> None:
        if key not in self._node_by_key:
            return  # a goodbye from a peer already lost (or never met): nothing to do, nothing to report
        rec = self._fresh(key, source, p.session, p.counter, "bye-refused")
        if rec is not None and p.node_id == rec.node_id and p.swarm_id == self.swarm_id:
            self._lose(rec.node_id, "bye")

    def _admit(self, key: bytes, session: int, counter: int, event: str, label: str, source: tuple[str, int]) -> bool:
        if self._replay.admit(key, session, counter):
            return True
        self._drop(event, label, "replay", source=f"{source[0]}:{source[1]}")
        return False

    def _fresh(self, key: bytes, source: tuple[str, int], session: int, counter: int, event: str) -> _Peer | None:
        """The known peer that signed a message of its current session never seen before, its silence timer reset;
        else None, with the message dropped and the reason logged once."""
        node = self._node_by_key.get(key)
        rec = self._peers.get(node) if node is not None else None
        if rec is None:
            self._drop(event, f"{source[0]}:{source[1]}", "unknown_sender")
            return None
        if not self._admit(key, session, counter, event, rec.node_id, source):
            return None
        if session != rec.session:  # it restarted and its hello is still on the way: its new run is not known yet
            self._drop(event, rec.node_id, "session_mismatch")
            return None
        rec.last_seen = time.monotonic()
        return rec

    def _lose(self, node_id: str, reason: str) -> None:
        rec = self._peers.pop(node_id, None)
        if rec is None:
            return
        self._node_by_key.pop(rec.key_bin, None)
        self._hello_sent.pop(rec.key_bin, None)
        self._book.forget(node_id)
        if self._community is not None:
            known = self._community.network.get_verified_by_public_key_bin(rec.key_bin)
            if known is not None:
                self._community.network.remove_peer(known)
        log.info("peer-lost peer=%s reason=%s", node_id, reason)
        if self._running:
            self._emit("on_peer_lost", rec.info())

    def _foreign_packet(self, source: Any, data: bytes) -> None:
        # b"\0\2" starts every IPv8 community packet: this one belongs to another swarm (or another IPv8 app).
        self._bad_packet(source, "other_swarm" if data[:2] == b"\x00\x02" else "not_ipv8")

    def _bad_packet(self, source: Any, reason: str, **fields: Any) -> None:
        self.stats.dropped += 1
        self._once("packet-refused", f"{source[0]}:{source[1]}", reason, node=self.node_id, **fields)

    def _emit(self, name: str, *args: Any) -> None:
        if self._events is None:
            return
        try:
            getattr(self._events, name)(*args)
        except Exception as exc:  # the node's handler failed: say so loudly (once per kind), keep the transport alive
            self._once("event-handler-failed", "-", f"{name}:{type(exc).__name__}", node=self.node_id, level=logging.ERROR, exc_info=exc, error=str(exc)[:200])

    # -- Transport interface ---------------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        return [p.info() for p in self._peers.values()]

    def send_model(self, peer_id: str, update: OutgoingUpdate) -> None:
        if not self._running:
            self._drop("send-failed", peer_id, "not_started")
            return
        rec = self._peers.get(peer_id)
        if rec is None:
            self._drop("send-failed", peer_id, "unknown_peer")
            return
        try:
            meta = encode_body(dict(update.meta), limit=MAX_META_BYTES, what="update meta")
            if not update.encoding or len(update.encoding) > MAX_ENCODING:
                raise NetworkError(f"encoding name must have 1-{MAX_ENCODING} characters")
            if update.round < 0 or update.sample_count < 0:
                raise NetworkError("round and sample count must not be negative")
        except NetworkError as exc:
            self._drop("send-failed", peer_id, "bad_update", detail=exc.message)
            return
        self._spawn(self._offer(rec, update, meta), f"offer-{peer_id}")

    def send_message(self, peer_id: str, kind: str, body: dict[str, ControlValue]) -> None:
        check_kind(kind)
        data = encode_body(dict(body))
        if not self._running:
            self._drop("message-failed", peer_id, "not_started")
            return
        rec = self._peers.get(peer_id)
        if rec is None:
            self._drop("message-failed", peer_id, "unknown_peer")
            return
        self._send(rec.address, ControlPayload(self.swarm_id, *self._stamp(), peer_id, kind, data))

    # -- offering --------------------------------------------------------------------------------------------------
    async def _digest(self, payload: bytes | bytearray | memoryview) -> bytes:
        """sha256 of ``payload``, computed once when the same object goes to several peers."""
        key = id(payload)
        cached = self._digests.entries.get(key)
        if cached is not None and cached[0] is payload:
            return await asyncio.shield(cached[1])
        assert self._loop is not None
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._digests.entries[key] = (payload, fut)
        while len(self._digests.entries) > 4:
            self._digests.entries.popitem(last=False)
        try:
            value = await asyncio.to_thread(digest, payload) if len(payload) > HASH_IN_THREAD else digest(payload)
        except BaseException as exc:
            self._digests.entries.pop(key, None)
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
            raise
        fut.set_result(value)
        return value

    async def _offer(self, rec: _Peer, update: OutgoingUpdate, meta: bytes) -> None:
        payload = update.payload
        dig = await self._digest(payload)
        if not self._running or self._peers.get(rec.node_id) is not rec:
            return
        offer_id = os.urandom(stream.OFFER_ID_BYTES)
        fields = (
            offer_id,
            update.round,
            self.node_id,
            rec.node_id,
            rec.mid,
            len(payload),
            dig,
            update.encoding,
            update.sample_count,
            meta,
            self.tcp_port,
        )
        now = time.monotonic()
        self._outgoing[offer_id] = _Outgoing(offer_id, rec.node_id, rec.public_key, payload, len(payload), fields, rec.address, now, now)
        pending = [o for o in self._outgoing.values() if o.recipient == rec.node_id and not o.serving]
        for stale in pending[:-MAX_PENDING_PER_PEER]:  # a peer that never fetches must not pin every update we ever offered it
            del self._outgoing[stale.offer_id]
        self._send(rec.address, OfferPayload(self.swarm_id, *self._stamp(), *fields))

    async def _accept_loop(self) -> None:
        assert self._loop is not None and self._lsock is not None and self._serve_slots is not None
        lsock = self._lsock
        while self._running:
            try:
                conn, addr = await self._loop.sock_accept(lsock)
            except OSError as exc:
                if not self._running:
                    return
                log.warning("accept-failed node=%s error=%s", self.node_id, exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            if not self.guard.allows(addr[0]) or self._serve_slots.locked():
                conn.close()
                self._once("fetch-refused", str(addr[0]), "not_allowed" if not self.guard.allows(addr[0]) else "busy")
                continue
            self._spawn(self._serve(conn, (str(addr[0]), int(addr[1]))), "serve")

    async def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        assert self._loop is not None and self._serve_slots is not None and self._community is not None
        loop = self._loop
        out: _Outgoing | None = None
        label = addr[0]  # the source port of a TCP connection is random: it names nobody
        async with self._serve_slots:
            try:
                stream.tune(conn)
                nonce = stream.new_nonce()
                my_key = self._key.pub().key_to_bin()
                async with asyncio.timeout(self.connect_timeout):  # the whole request, however slowly it trickles in
                    await loop.sock_sendall(conn, stream.CHALLENGE.pack(stream.CHALLENGE_MAGIC, stream.PROTOCOL, nonce))
                    head = await stream.recv_exact(loop, conn, stream.REQUEST_HEAD.size, self.connect_timeout)
                    magic, offer_id, sig_len = stream.REQUEST_HEAD.unpack(head)
                    if magic != stream.REQUEST_MAGIC or not 0 < sig_len <= stream.MAX_SIGNATURE:
                        raise stream.FetchError("malformed_request")
                    signature = await stream.recv_exact(loop, conn, sig_len, self.connect_timeout)
                out = self._outgoing.get(offer_id)
                if out is None:
                    await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.UNKNOWN_OFFER, 0))
                    raise stream.FetchError("unknown_offer")
                label = out.recipient
                statement = stream.fetch_statement(self._community.community_id, offer_id, nonce, my_key)
                if not default_eccrypto.is_valid_signature(out.recipient_key, statement, signature):
                    await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.NOT_RECIPIENT, 0))
                    label = addr[0]  # the source port of a TCP connection is random: it names nobody
                    out = None
                    raise stream.FetchError("not_recipient")
                if out.serving:
                    await loop.sock_sendall(conn, stream.RESPONSE.pack(stream.BUSY, 0))
                    out = None
                    raise stream.FetchError("already_fetching")
                out.serving = True
                budget = self.fetch_timeout + out.size / MIN_RATE
                header = stream.RESPONSE.pack(stream.OK, out.size)
                if out.size > HASH_IN_THREAD:
                    await loop.run_in_executor(self._pool, stream.send_blob, conn, header, out.payload, budget)
                else:
                    async with asyncio.timeout(budget):
                        await loop.sock_sendall(conn, header + bytes(out.payload))
                self.stats.models_sent += 1
                self.stats.bytes_sent += out.size
                self._outgoing.pop(offer_id, None)
            except stream.FetchError as exc:
                self._drop("fetch-refused", label, exc.reason)
            except (TimeoutError, OSError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else "recipient_vanished"
                self._drop("serve-failed", label, reason)
                if out is not None:
                    self._outgoing.pop(out.offer_id, None)
            finally:
                _close(conn)

    # -- fetching --------------------------------------------------------------------------------------------------
    def _on_offer(self, key: bytes, source: tuple[str, int], p: OfferPayload) -> None:
        if not self._running:
            return
        rec = self._fresh(key, source, p.session, p.counter, "offer-refused")
        if rec is None:
            return
        if p.swarm_id != self.swarm_id or p.sender != rec.node_id:
            self._drop("offer-refused", rec.node_id, "wrong_sender")
            return
        my_mid = hashlib.sha1(self._key.pub().key_to_bin()).digest()
        if p.recipient != self.node_id or p.recipient_mid != my_mid:
            self._drop("offer-refused", rec.node_id, "wrong_recipient")
            return
        if p.size > self.max_model_bytes:
            self._drop("offer-refused", rec.node_id, "oversized", size=p.size, limit=self.max_model_bytes)
            self._decline(rec, p.offer_id, "oversized")
            return
        try:
            meta = decode_body(p.meta, limit=MAX_META_BYTES)
            if not p.encoding or len(p.encoding) > MAX_ENCODING:
                raise ValueError("bad encoding name")
        except (ValueError, UnicodeDecodeError):
            self._drop("offer-refused", rec.node_id, "bad_meta")
            self._decline(rec, p.offer_id, "bad_meta")
            return
        verdict = self._book.verdict(rec.node_id, p.round, p.offer_id)
        if verdict is not None:
            log.debug("offer-ignored peer=%s reason=%s round=%d", rec.node_id, verdict, p.round)
            if verdict == "out_of_date":
                self._decline(rec, p.offer_id, verdict)
            return
        self._book.take(rec.node_id, p.round, p.offer_id)
        self._spawn(self._fetch(rec, p, meta), f"fetch-{rec.node_id}")

    async def _fetch(self, rec: _Peer, p: OfferPayload, meta: dict[str, Any]) -> None:
        assert self._loop is not None and self._fetch_slots is not None and self._community is not None
        loop = self._loop
        host = rec.address[0]
        if not self.guard.allows(host):
            self.guard.refuse(host, "tcp")
            return
        async with self._fetch_slots:
            # An overall budget besides the idle timeouts: a sender that trickles bytes must not hold a slot forever.
            # (loop.time() is time.monotonic(), the clock receive_blob reads.)
            started = loop.time()
            deadline = started + self.connect_timeout + self.fetch_timeout + p.size / MIN_RATE
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                async with asyncio.timeout_at(deadline):
                    stream.tune(sock)
                    await asyncio.wait_for(loop.sock_connect(sock, (host, p.tcp_port)), self.connect_timeout)
                    challenge = await stream.recv_exact(loop, sock, stream.CHALLENGE.size, self.connect_timeout)
                    magic, version, nonce = stream.CHALLENGE.unpack(challenge)
                    if magic != stream.CHALLENGE_MAGIC or version != stream.PROTOCOL:
                        raise stream.FetchError("malformed_challenge")
                    statement = stream.fetch_statement(self._community.community_id, p.offer_id, nonce, rec.key_bin)
                    signature = default_eccrypto.create_signature(self._key, statement)
                    await loop.sock_sendall(sock, stream.REQUEST_HEAD.pack(stream.REQUEST_MAGIC, p.offer_id, len(signature)) + signature)
                    status, size = stream.RESPONSE.unpack(await stream.recv_exact(loop, sock, stream.RESPONSE.size, self.fetch_timeout))
                    if status != stream.OK:
                        raise stream.FetchError(f"refused_{stream.STATUS_REASONS.get(status, 'unknown')}")
                    if size != p.size:
                        raise stream.FetchError("size_mismatch", f"offered {p.size}, sent {size}")
                    if size > HASH_IN_THREAD:
                        buf, got_digest = await loop.run_in_executor(self._pool, stream.receive_blob, sock, size, self.fetch_timeout, deadline)
                    else:
                        buf = bytearray(size)
                        await stream.recv_into(loop, sock, memoryview(buf), self.fetch_timeout)
                        got_digest = digest(buf)
            except stream.FetchError as exc:
                self._drop("fetch-failed", rec.node_id, "sender_vanished" if exc.reason == "truncated" else exc.reason, round=p.round)
                return
            except TimeoutError:
                reason = "too_slow" if loop.time() >= deadline else "timeout"
                self._drop("fetch-failed", rec.node_id, reason, round=p.round, budget_s=round(deadline - started, 1))
                return
            except OSError as exc:
                reason = "connection_refused" if isinstance(exc, ConnectionRefusedError) else "sender_vanished"
                self._drop("fetch-failed", rec.node_id, reason, round=p.round)
                return
            finally:
                _close(sock)
        if got_digest != p.digest:
            self._drop("fetch-failed", rec.node_id, "digest_mismatch", round=p.round)
            return
        if not self._running:
            return
        self.stats.models_received += 1
        self.stats.bytes_received += size
        rec.last_seen = time.monotonic()
        self._emit(
            "on_model",
            ModelReceived(
                sender=rec.node_id,
                round=p.round,
                payload=buf,
                sample_count=p.sample_count,
                encoding=p.encoding,
                meta=meta,
                received_at=time.monotonic(),
            ),
        )

    def _decline(self, rec: _Peer, offer_id: bytes, reason: str) -> None:
        self._send(rec.address, DeclinePayload(self.swarm_id, *self._stamp(), offer_id, reason))

    def _on_decline(self, key: bytes, source: tuple[str, int], p: DeclinePayload) -> None:
        if key not in self._node_by_key:
            return  # we offered nothing to a peer we do not know
        rec = self._fresh(key, source, p.session, p.counter, "decline-refused")
        out = self._outgoing.get(p.offer_id)
        if rec is None or out is None or out.recipient != rec.node_id or out.serving or p.swarm_id != self.swarm_id:
            return
        del self._outgoing[p.offer_id]
        self._drop("offer-declined", rec.node_id, p.reason[:64] if _valid_node_id(p.reason[:64]) else "unspecified")

    def _on_control(self, key: bytes, source: tuple[str, int], p: ControlPayload) -> None:
        if not self._running:
            return
        rec = self._fresh(key, source, p.session, p.counter, "message-refused")
        if rec is None:
            return
        if p.swarm_id != self.swarm_id or p.recipient != self.node_id:
            self._drop("message-refused", rec.node_id, "wrong_recipient")
            return
        try:
            check_kind(p.kind)
            body = decode_body(p.body)
        except (NetworkError, ValueError, UnicodeDecodeError):
            self._drop("message-refused", rec.node_id, "bad_body")
            return
        self._emit("on_message", rec.node_id, p.kind, body)

    def _drop(self, event: str, peer: str, reason: str, **fields: Any) -> None:
        self.stats.dropped += 1
        self._once(event, peer, reason, node=self.node_id, **fields)


def _close(sock: socket.socket) -> None:
    """Shut down first: a worker thread blocked in send or recv on this socket wakes up instead of lingering."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _label(node_id: str, source: tuple[str, int]) -> str:
    """How a log line names the sender of a hello: its node id, unless that is unfit for a log line."""
    return node_id if _valid_node_id(node_id) else f"{source[0]}:{source[1]}"


def _valid_node_id(node_id: str) -> bool:
    return 0 < len(node_id) <= MAX_NODE_ID and node_id.isprintable() and not any(c.isspace() or c == "=" for c in node_id)


def _addr(address: Any) -> tuple[str, int]:
    return str(address[0]), int(address[1])


