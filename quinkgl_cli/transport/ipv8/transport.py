"""The daemon's transport: an IPv8 community per swarm for discovery and signed control traffic, TCP for model bytes.

Owns the lifecycle and the wiring only: `start` builds the parts inside the running loop (IPv8 objects must be
built there) and `stop` takes them down on the same loop. The parts own the state: `membership` (peer table,
hellos, replay checks), `outbox` (our offers, resends), `server` (serving them over TCP), `fetcher` (fetching
theirs), `runtime` (tasks, the node's callbacks), `dispatch` (the community's handlers).

Event callbacks run on the loop and must not block it; training belongs in a worker thread, or peers stop hearing
our heartbeats and report us lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ipv8.messaging.interfaces.lan_addresses.interfaces import get_providers
from ipv8.peer import Peer
from ipv8.peerdiscovery.network import Network

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.transport.admission import Admission, AdmissionSettings
from quinkgl_cli.transport.base import OutgoingUpdate, PeerInfo, TransportEvents, TransportStats
from quinkgl_cli.transport.common import PROTOCOL_VERSION, DropLog, RuledTransport
from quinkgl_cli.transport.ipv8.busy import BusyReplies
from quinkgl_cli.transport.ipv8.community import LOGGER_NAME, SwarmCommunity, SwarmSettings, community_class
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.dispatch import Dispatch, Routes
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard, GuardedUDPEndpoint
from quinkgl_cli.transport.ipv8.fetcher import Fetcher
from quinkgl_cli.transport.ipv8.forward import Forwarder
from quinkgl_cli.transport.ipv8.identity import next_session, swarm_identity
from quinkgl_cli.transport.ipv8.lan import LanBeacon
from quinkgl_cli.transport.ipv8.links import Links
from quinkgl_cli.transport.ipv8.membership import Membership, add_bootstrappers, resolve_seeds
from quinkgl_cli.transport.ipv8.outbox import Outbox
from quinkgl_cli.transport.ipv8.payloads import ControlPayload
from quinkgl_cli.transport.ipv8.peers import PeerTable
from quinkgl_cli.transport.ipv8.probes import Probes
from quinkgl_cli.transport.ipv8.reach import Reachability
from quinkgl_cli.transport.ipv8.rejoin import Rejoin
from quinkgl_cli.transport.ipv8.relay import Relay
from quinkgl_cli.transport.ipv8.runtime import NodeEvents, TaskRegistry
from quinkgl_cli.transport.ipv8.seal import DatagramSeal
from quinkgl_cli.transport.ipv8.server import FetchServer, listen_tcp
from quinkgl_cli.transport.ipv8.services import Services
from quinkgl_cli.transport.ipv8.settings import (
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_PEERS,
    Limits,
    TransportSettings,
    parse_address,
)
from quinkgl_cli.transport.ipv8.udpway import UdpWay
from quinkgl_cli.transport.rendezvous import Rendezvous

log = logging.getLogger("quinkgl.transport")
STOP_POLL = 0.02  # seconds between looks at the outbox while stopping

_IPV8_LOGGERS = (
    "ipv8",
    LOGGER_NAME,
    "TaskManager",
    "RandomWalk",
    "UDPEndpoint",
    "GuardedUDPEndpoint",
    "Network",
    "DispersyBootstrapper",
)


def _quiet_ipv8_logging() -> None:
    """IPv8 logs malformed packets with whole payloads and tracebacks: keep only its warnings and worse."""
    for name in _IPV8_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


@dataclass
class Parts:
    """What a started transport runs on; gone again after stop."""

    key: Any
    endpoint: GuardedUDPEndpoint
    community: SwarmCommunity
    courier: Courier
    table: PeerTable
    membership: Membership
    outbox: Outbox
    server: FetchServer
    fetcher: Fetcher
    services: Services
    relay: Relay
    links: Links
    probes: Probes
    forwarder: Forwarder
    udp: UdpWay
    rejoin: Rejoin
    lan: LanBeacon | None  # --lan-discovery
    reach: Reachability
    tasks: TaskRegistry
    pool: ThreadPoolExecutor


def _with_relay(limits: Limits, volunteer: bool, rate: int | None) -> Limits:
    """``limits`` with the relay switched on (``--relay``) and its rate set (``--relay-rate``), when asked."""
    relay = limits.relay
    if volunteer:
        relay = replace(relay, volunteer=True)
    if rate is not None:
        if rate <= 0:
            raise NetworkError(f"relay rate must be positive, not {rate}")
        relay = replace(relay, rate=rate)
    return replace(limits, relay=relay)


class IPv8Transport(RuledTransport):
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
        relay: bool = False,
        relay_rate: int | None = None,
        walk_interval: float = 0.5,
        heartbeat_interval: float = 2.0,
        silence_timeout: float = 12.0,
        connect_timeout: float = 3.0,
        fetch_timeout: float = 10.0,
        offer_ttl: float = 60.0,
        max_peers: int = DEFAULT_MAX_PEERS,
        max_concurrent_fetches: int = 4,
        protocol_version: int = PROTOCOL_VERSION,
        limits: Limits | None = None,
        rendezvous: Rendezvous | None = None,
        admission: AdmissionSettings | None = None,
    ) -> None:
        self.settings = TransportSettings(
            node_id=node_id, swarm_id=swarm_id, arch_hash=arch_hash, state_dir=Path(state_dir), listen_host=listen_host,
            port=port, bootstrap=tuple(parse_address(b) for b in bootstrap), max_model_bytes=max_model_bytes,
            enable_public_bootstrap=enable_public_bootstrap, enable_lan_discovery=enable_lan_discovery,
            walk_interval=walk_interval, heartbeat_interval=heartbeat_interval, silence_timeout=silence_timeout,
            connect_timeout=connect_timeout, fetch_timeout=fetch_timeout, offer_ttl=offer_ttl, max_peers=max_peers,
            max_concurrent_fetches=max_concurrent_fetches, protocol_version=protocol_version,
            limits=_with_relay(limits or Limits(), relay, relay_rate),
        )
        self.node_id = node_id
        self.swarm_id = swarm_id
        self.arch_hash = arch_hash
        self.stats = TransportStats()
        self.guard = DestinationGuard(self.settings.listen_host)
        self.drops = DropLog(self.stats, node_id)
        self.running = False
        self.tcp_port = 0
        self.parts: Parts | None = None
        # Same-host discovery: announced once bound, read for seeds while running, withdrawn at stop.
        self.rendezvous = rendezvous
        self._dispatch = Dispatch(swarm_id, node_id, self.drops)
        # Open and unsigned unless told otherwise: nobody's certificate is asked for, nothing can be revoked.
        self.admission = Admission(admission or AdmissionSettings(swarm_id, None), node_id)

    # -- identity and addresses ------------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self.parts is None:
            raise NetworkError("transport is not started")
        host, port = self.parts.endpoint.get_address()[:2]
        return str(host), int(port)

    @property
    def public_key(self) -> str:
        return self.parts.key.pub().key_to_bin().hex() if self.parts is not None else ""

    @property
    def community_id(self) -> bytes:
        if self.parts is None:
            raise NetworkError("transport is not started")
        return self.parts.community.community_id

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self, events: TransportEvents) -> None:
        if self.running:
            raise NetworkError(f"transport {self.node_id} is already started")
        s = self.settings
        loop = asyncio.get_running_loop()
        _quiet_ipv8_logging()
        get_providers().clear()  # nothing in this process may go looking for the host's LAN addresses
        key = swarm_identity(s.state_dir, s.swarm_id)
        session = next_session(s.state_dir)
        endpoint = GuardedUDPEndpoint(s.listen_host, s.port, self.guard, DatagramSeal(self.admission.settings.sealing_key()))
        endpoint.on_foreign, endpoint.on_transfer, endpoint.on_chunk = self._dispatch.foreign_transfer_chunk()
        await endpoint.open()
        lsock = None
        community: SwarmCommunity | None = None
        lan: LanBeacon | None = None
        try:
            udp_port = int(endpoint.get_address()[1])
            lsock = listen_tcp(s.listen_host, udp_port, s.port)
            cls = community_class(self.admission.settings.sealing_key())
            community = cls(SwarmSettings(
                my_peer=Peer(key), endpoint=endpoint, network=Network(), max_peers=s.max_peers, handlers=self._dispatch,
                protocol_version=s.protocol_version, bound=(s.listen_host, udp_port),
            ))
            if community.community_id != cls.community_id or community.get_prefix()[2:] != cls.community_id:
                raise NetworkError("IPv8 community id did not take", "pyipv8 changed: check the pinned version")
            add_bootstrappers(community, s)
            seeds = await resolve_seeds(s, self.guard, udp_port)
            if s.enable_lan_discovery:
                lan = LanBeacon(community, endpoint.seal, s.listen_host, udp_port, self.guard, self.node_id)
                await lan.open()
        except BaseException:
            if lan is not None:
                lan.close()
            if lsock is not None:
                lsock.close()
            if community is not None:
                await community.unload()
            endpoint.close()
            await asyncio.sleep(0)  # the datagram transport releases its socket on the next loop pass
            raise
        self.tcp_port = int(lsock.getsockname()[1])
        self.parts = self._assemble(loop, events, key, session, endpoint, community, lsock, seeds, lan)
        if self.rendezvous is not None:
            self.rendezvous.announce(s.listen_host, udp_port)
        self.running = True
        self.parts.tasks.spawn(self.parts.server.accept_loop(), "accept")
        self.parts.tasks.spawn(self._tick_loop(), "tick")
        emit(log, logging.INFO, "transport-started", context={"node": self.node_id}, kind="ipv8", swarm=s.swarm_id,
             udp=f"{s.listen_host}:{udp_port}", tcp=self.tcp_port, key=self.public_key[-16:], bootstrap=len(s.bootstrap),
             lan_discovery=s.enable_lan_discovery, public_bootstrap=s.enable_public_bootstrap, relay=s.limits.relay.volunteer,
             rendezvous=self.rendezvous.directory if self.rendezvous is not None else None)

    def _assemble(self, loop: asyncio.AbstractEventLoop, events: TransportEvents, key: Any, session: int,
                  endpoint: GuardedUDPEndpoint, community: SwarmCommunity, lsock: Any, seeds: list[tuple[str, int]],
                  lan: LanBeacon | None) -> Parts:
        """The parts of a started transport, wired to each other; no I/O."""
        s, drops = self.settings, self.drops
        node_events = NodeEvents(events, drops.once)
        tasks = TaskRegistry(loop, self.node_id)
        pool = ThreadPoolExecutor(max_workers=s.limits.serve_slots + s.max_concurrent_fetches, thread_name_prefix="quinkgl-transfer")
        courier = Courier(community, endpoint, session, s.swarm_id)
        table = PeerTable(s.max_peers)
        outbox = Outbox(s, table, courier, drops, self.tcp_port)
        server = FetchServer(s, lsock, outbox, key, community.community_id, self.guard, pool, tasks, drops, self.stats,
                             self.admission.revoked, self.report_transfer)
        services = Services(s, table, courier, int(endpoint.get_address()[1]))
        relay = Relay(s, table, tasks, drops)
        probes = Probes(s, courier, self.guard, tasks, drops)
        links = Links(s, courier, services, relay, outbox, server, self.guard, tasks, drops, probes, BusyReplies(s, courier, drops))
        udp = UdpWay(s, community.community_id, courier, outbox, endpoint, tasks, drops, self.stats, server.revoked, self.report_transfer, links.busy)
        fetcher = Fetcher(s, key, community.community_id, courier, links, udp, self.guard, pool, tasks, node_events, drops,
                          self.stats, self.report_transfer)
        rejoin = Rejoin(community, table, self.guard)
        forwarder: Forwarder | None = None

        def lost(node_id: str, address: tuple[str, int], reason: str) -> None:
            fetcher.forget(node_id)
            services.forget(node_id)
            relayed = courier.relayed(address)
            courier.unroute(address)
            if forwarder is not None:
                forwarder.forget(node_id)
            if not relayed:  # a relay's word for where a peer sits is no address to knock at after a split
                rejoin.forget_peer(node_id, address, reason, time.monotonic())

        membership = Membership(s, table, courier, community, node_events, drops, self.tcp_port, seeds, lost,
                                self.admission, local_seeds=self._local_seeds if self.rendezvous is not None else None,
                                backlog=endpoint.backlog)
        forwarder = Forwarder(s, table, courier, services, drops, key.pub().key_to_bin(),
                              lambda: membership.hello_payload(want_reply=True))
        self._dispatch.attach(Routes(membership, outbox, fetcher, node_events, services, links, probes, forwarder, community, udp))
        reach = Reachability(self.node_id, s.listen_host, services.bound, self.tcp_port, services, links, s.limits.relay.volunteer)
        return Parts(key, endpoint, community, courier, table, membership, outbox, server, fetcher, services, relay, links,
                     probes, forwarder, udp, rejoin, lan, reach, tasks, pool)

    def _local_seeds(self) -> list[tuple[str, int]]:
        """The other daemons of this swarm on this host, from the rendezvous directory, where we may send."""
        assert self.rendezvous is not None
        own = self.address
        return [(e.host, e.port) for e in self.rendezvous.peers()
                if (e.host, e.port) != own and self.guard.allows(e.host)]

    async def stop(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.withdraw()
        if not self.running:
            await self._teardown()
            return
        await self._serve_pending()
        self.running = False
        if self.parts is not None:
            self.parts.membership.say_goodbye()
        await self._teardown()
        emit(log, logging.INFO, "transport-stopped", context={"node": self.node_id}, kind="ipv8", blocked_sends=self.guard.blocked)

    async def _serve_pending(self) -> None:
        """Give peers still here a moment to fetch what we offered them last (a node's final exchange is offered just
        before it stops): closing first would fail their fetch with connection_refused. Bounded by ``stop_grace``."""
        deadline = time.monotonic() + self.settings.limits.stop_grace
        while self.parts is not None and self.parts.outbox.awaited() and time.monotonic() < deadline:
            await asyncio.sleep(STOP_POLL)

    async def _teardown(self) -> None:
        self._dispatch.attach(None)
        parts, self.parts = self.parts, None
        if parts is None:
            return
        parts.membership.active = False
        parts.fetcher.active = False
        await parts.tasks.cancel_all()
        parts.server.close()
        parts.relay.close()
        if parts.lan is not None:
            parts.lan.close()
        await parts.community.unload()
        parts.endpoint.close()
        await asyncio.sleep(0)  # the datagram transport releases its socket on the next loop pass
        parts.pool.shutdown(wait=False, cancel_futures=True)
        parts.table.clear()
        parts.outbox.offers.clear()

    # -- periodic work ---------------------------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while self.running:
            try:
                self._tick()
            except Exception as exc:  # a periodic body that raises would end discovery silently: log and go on
                # once per exception type with its traceback, then at DEBUG: the same bug must not log every tick
                self.drops.once("transport-tick-failed", "-", type(exc).__name__, level=logging.ERROR, exc_info=exc, error=str(exc)[:200])
            await asyncio.sleep(self.settings.walk_interval)

    def _tick(self) -> None:
        if self.parts is None:
            return
        now = time.monotonic()
        self.parts.membership.tick(now)
        self.parts.outbox.tick(now)
        self.parts.services.tick(now)
        self.parts.forwarder.tick(now)
        self.parts.rejoin.tick(now)
        if self.parts.lan is not None:
            self.parts.lan.tick(now)
        self.parts.reach.tick()

    # -- Transport interface ---------------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        return [p.info() for p in self.parts.table] if self.parts is not None else []

    def revoked(self) -> bool:
        return self.parts is not None and self.admission.revoked(self.parts.key.pub().key_to_bin())

    def named_peers(self) -> int:
        return self.parts.membership.named() if self.parts is not None else 0

    def reachability(self) -> dict[str, object]:
        """How peers see this node (NAT type, TCP reachability, relays, the way each sender's models come)."""
        return self.parts.reach.view() if self.parts is not None else {}

    async def probe_tcp(self, peer_id: str) -> tuple[bool, str] | None:
        """Whether ``peer_id`` reaches our TCP port when asked to, and whether we reach its (``open`` or why not);
        None when it is not a peer (any more)."""
        p = self.parts
        rec = p.table.get(peer_id) if p is not None else None
        if p is None or rec is None:
            return None
        reached, out = await asyncio.gather(p.probes.inbound(rec, self.tcp_port), p.probes.outbound(rec))
        return reached, out

    def peer_view(self, peer_id: str) -> dict[str, Any] | None:
        """What we know of how ``peer_id`` and we reach each other: its address, where it sees our datagrams come
        from, whether it relays, the relay our datagrams to it go through (``via``, None when direct), and the ways
        its models would come, in the order they are tried (`paths`)."""
        p = self.parts
        rec = p.table.get(peer_id) if p is not None else None
        if p is None or rec is None:
            return None
        seen = p.services.seen_by.get(peer_id)
        return {"address": f"{rec.address[0]}:{rec.address[1]}", "tcp_port": rec.tcp_port,
                "seen_as": f"{seen[0]}:{seen[1]}" if seen else None, "relay": peer_id in p.services.relays,
                "via": rec.via, "routes": [str(r) for r in p.links.routes(rec)]}

    def cut_off(self) -> list[str]:
        return self.parts.rejoin.cut_off(time.monotonic()) if self.parts is not None else []

    def rejoin(self) -> int:
        return self.parts.rejoin.knock(time.monotonic()) if self.parts is not None else 0

    def knows(self, peer_id: str) -> bool:
        return self.parts is not None and self.parts.table.get(peer_id) is not None

    def _offer(self, peer_id: str, update: OutgoingUpdate, meta: bytes) -> None:
        assert self.parts is not None  # knows() said so
        p = self.parts
        rec = p.table.get(peer_id)
        assert rec is not None
        now = time.monotonic()
        refused = p.outbox.refusal(rec, now)
        if refused is not None:
            self.drops("send-failed", peer_id, refused, unanswered=rec.unanswered)
            return
        rec.last_offer = now
        p.tasks.spawn(p.outbox.offer(rec, update.round, update.payload, update.encoding, update.sample_count, meta), f"offer-{peer_id}")

    def _deliver(self, peer_id: str, kind: str, data: bytes) -> None:
        assert self.parts is not None
        p = self.parts
        rec = p.table.get(peer_id)
        assert rec is not None
        p.courier.send(rec.address, ControlPayload(self.swarm_id, *p.courier.stamp(), rec.claimed, kind, data))
