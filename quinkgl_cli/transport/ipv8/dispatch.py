"""The community's handlers: which part of the transport deals with each kind of datagram.

Owns only the routing, the moment it starts and stops (before the parts are attached, and after the transport
stops, everything heard is ignored) and, while a relayed packet is handled, which relay brought it (`forward`).
Control messages are small enough to be handled here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.common import DropLog, check_kind, decode_body
from quinkgl_cli.transport.ipv8.community import SwarmCommunity
from quinkgl_cli.transport.ipv8.fetcher import Fetcher
from quinkgl_cli.transport.ipv8.forward import Forwarder
from quinkgl_cli.transport.ipv8.links import Links
from quinkgl_cli.transport.ipv8.membership import Membership
from quinkgl_cli.transport.ipv8.outbox import Outbox
from quinkgl_cli.transport.ipv8.payloads import (
    BusyPayload,
    ByePayload,
    ControlPayload,
    DeclinePayload,
    ForwardedPayload,
    HelloHead,
    HelloPayload,
    OfferPayload,
    PathRequestPayload,
    RelayedPayload,
    RevocationPayload,
    RosterPayload,
    ServicesPayload,
    UdpPullPayload,
)
from quinkgl_cli.transport.ipv8.probes import PROBE, Probes
from quinkgl_cli.transport.ipv8.runtime import NodeEvents
from quinkgl_cli.transport.ipv8.services import Services
from quinkgl_cli.transport.ipv8.udpway import UdpWay


@dataclass
class Routes:
    membership: Membership
    outbox: Outbox
    fetcher: Fetcher
    events: NodeEvents
    services: Services
    links: Links
    probes: Probes
    forwarder: Forwarder
    community: SwarmCommunity
    udp: UdpWay


class Dispatch:
    """Implements `community.CommunityHandlers`."""

    def __init__(self, swarm_id: str, node_id: str, drops: DropLog) -> None:
        self._swarm_id = swarm_id
        self._node_id = node_id
        self._drops = drops
        self._routes: Routes | None = None
        self._via: str | None = None  # while a relayed packet is handled: the relay peer that brought it

    def attach(self, routes: Routes | None) -> None:
        """Start routing to ``routes``; None stops (the transport is stopping)."""
        self._routes = routes

    def on_foreign(self, source: Any, reason: str) -> None:
        """A datagram the endpoint did not open with our swarm key (``cleartext``: an older version's or another
        IPv8 application's; ``other_swarm``: sealed with another key, or noise), or one of another community."""
        self.on_bad_packet((str(source[0]), int(source[1])), reason)

    def on_transfer(self, source: Any, packet: bytes) -> None:
        """A datagram of a model transfer over UDP (`udpway`), opened by the endpoint; IPv8 never sees those."""
        if self._routes is not None:
            self._routes.udp.on_datagram(source, packet)  # (host, port), as the socket gave it

    def foreign_transfer_chunk(self) -> tuple[Callable[[Any, str], None], Callable[[Any, bytes], None], Callable[[Any, bytes], bool]]:
        """The endpoint's three hooks, in its order (`endpoint.GuardedUDPEndpoint`)."""
        return self.on_foreign, self.on_transfer, self.on_chunk

    def on_chunk(self, source: Any, datagram: bytes) -> bool:
        """A datagram as it came, before the swarm seal: True when it is a chunk of one of our UDP transfers."""
        return self._routes is not None and self._routes.udp.take(source, datagram)

    def on_bad_packet(self, source: tuple[str, int], reason: str, **fields: Any) -> None:
        self._drops("packet-refused", f"{source[0]}:{source[1]}", reason, **fields)

    def admits(self, source: tuple[str, int], signer: bytes) -> bool:
        return self._routes is not None and self._routes.membership.admits(source, signer)

    def on_crowded(self) -> bool:
        return self._routes is not None and self._routes.membership.make_room()

    def on_contact(self, peer: Any) -> None:
        if self._routes is not None:
            self._routes.membership.on_contact(peer)

    def on_other_protocol(self, key: bytes, source: tuple[str, int], head: HelloHead) -> None:
        if self._routes is not None:
            self._routes.membership.on_other_protocol(source, head)

    def on_hello(self, key: bytes, source: tuple[str, int], payload: HelloPayload) -> None:
        if self._routes is not None:
            self._routes.membership.on_hello(key, source, payload, via=self._via)

    def on_bye(self, key: bytes, source: tuple[str, int], payload: ByePayload) -> None:
        if self._routes is not None:
            self._routes.membership.on_bye(key, source, payload)

    def on_revocations(self, key: bytes, source: tuple[str, int], payload: RevocationPayload) -> None:
        if self._routes is not None:
            self._routes.membership.on_revocations(key, source, payload)

    def on_offer(self, key: bytes, source: tuple[str, int], payload: OfferPayload) -> None:
        if self._routes is None:
            return
        rec = self._routes.membership.fresh(key, source, payload.session, payload.counter, "offer-refused")
        if rec is not None:
            self._routes.fetcher.on_offer(rec, payload)

    def on_decline(self, key: bytes, source: tuple[str, int], payload: DeclinePayload) -> None:
        r = self._routes
        if r is None or r.membership.table.node_of(key) is None:
            return  # we offered nothing to a peer we do not know
        rec = r.membership.fresh(key, source, payload.session, payload.counter, "decline-refused")
        if rec is not None and payload.swarm_id == self._swarm_id:
            r.outbox.on_decline(rec, payload.offer_id, payload.reason)

    def on_services(self, key: bytes, source: tuple[str, int], payload: ServicesPayload) -> None:
        r = self._routes
        if r is None or r.membership.table.node_of(key) is None:
            return  # a report from a stranger: nothing to learn from it
        rec = r.membership.fresh(key, source, payload.session, payload.counter, "services-refused")
        if rec is not None:
            r.services.on_services(rec, payload)

    def on_path_request(self, key: bytes, source: tuple[str, int], payload: PathRequestPayload) -> None:
        r = self._routes
        if r is None:
            return
        rec = r.membership.fresh(key, source, payload.session, payload.counter, "path-refused")
        if rec is None:
            return
        if payload.path == PROBE:
            r.probes.on_request(rec, payload)
        else:
            r.links.on_path_request(rec, payload)

    def on_udp_pull(self, key: bytes, source: tuple[str, int], payload: UdpPullPayload) -> None:
        r = self._routes
        rec = r.membership.fresh(key, source, payload.session, payload.counter, "pull-refused") if r is not None else None
        if r is not None and rec is not None:
            r.udp.on_pull(rec, payload)

    def on_busy(self, key: bytes, source: tuple[str, int], payload: BusyPayload) -> None:
        r = self._routes
        rec = r.membership.fresh(key, source, payload.session, payload.counter, "busy-refused") if r is not None else None
        if r is not None and rec is not None:
            r.links.busy.on_busy(rec, payload)

    def on_relayed(self, key: bytes, source: tuple[str, int], p: RelayedPayload) -> None:
        r = self._routes
        rec = r.membership.fresh(key, source, p.session, p.counter, "relay-refused") if r is not None else None
        if r is not None and rec is not None:
            r.forwarder.on_relayed(rec, p)

    def on_roster(self, key: bytes, source: tuple[str, int], p: RosterPayload) -> None:
        r = self._routes
        rec = r.membership.fresh(key, source, p.session, p.counter, "roster-refused") if r is not None else None
        if r is not None and rec is not None:
            r.forwarder.on_roster(rec, p)

    def on_forwarded(self, key: bytes, source: tuple[str, int], p: ForwardedPayload) -> None:
        """A packet another peer signed, brought by its relay: handled as that peer's own (its signature and replay
        checks included), knowing which relay brought it."""
        r = self._routes
        if r is None or self._via is not None:
            return
        relay = r.membership.fresh(key, source, p.session, p.counter, "forward-refused")
        origin = r.forwarder.open(relay, p) if relay is not None else None
        if relay is None or origin is None:
            return
        self._via = relay.node_id
        try:
            r.community.on_relayed_packet(origin, p.packet)
        finally:
            self._via = None

    def on_control(self, key: bytes, source: tuple[str, int], p: ControlPayload) -> None:
        r = self._routes
        if r is None:
            return
        rec = r.membership.fresh(key, source, p.session, p.counter, "message-refused")
        if rec is None:
            return
        if p.swarm_id != self._swarm_id or p.recipient != self._node_id:
            self._drops("message-refused", rec.node_id, "wrong_recipient")
            return
        try:
            check_kind(p.kind)
            body = decode_body(p.body)
        except (NetworkError, ValueError, UnicodeDecodeError):
            self._drops("message-refused", rec.node_id, "bad_body")
            return
        r.events.message(rec.node_id, p.kind, body)
