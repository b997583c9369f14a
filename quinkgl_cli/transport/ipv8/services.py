"""What peers tell each other about reachability: who volunteers as a relay, and where each sees the other.

Owns the relay volunteers known among our peers and the addresses our peers see our datagrams come from. Every
``INTERVAL`` seconds (and at first sight) each peer gets a signed `ServicesPayload` from us. From what they say
back, a node knows whether it sits behind a NAT (they see another address than the one it is bound to) and of
which kind: one mapping seen by all peers is endpoint-independent (punching works), several are a symmetric NAT
(punching cannot work; transfers need a relay).
"""

from __future__ import annotations

import ipaddress
import time

from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.payloads import ServicesPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.settings import TransportSettings

INTERVAL = 10.0  # seconds between our reports to one peer
MAX_SEEN = 64  # peers whose view of our address we keep, the latest reports


class Services:
    def __init__(self, settings: TransportSettings, table: PeerTable, courier: Courier, udp_port: int) -> None:
        self.settings = settings
        self.table = table
        self.courier = courier
        self.bound = (settings.listen_host, udp_port)
        self.relays: dict[str, int] = {}  # relay volunteers among our peers: node id -> their TCP port
        self.seen_by: dict[str, tuple[str, int]] = {}  # node id -> where that peer sees our datagrams come from
        self._told: dict[str, float] = {}  # node id -> when we last reported to it

    def tick(self, now: float) -> None:
        for rec in self.table:
            if now - self._told.get(rec.node_id, float("-inf")) >= INTERVAL:
                self.tell(rec, now)

    def tell(self, rec: PeerRecord, now: float | None = None) -> None:
        self._told[rec.node_id] = time.monotonic() if now is None else now
        # A peer we reach through a relay: we never saw its datagrams, so we say nothing of where they come from.
        seen = ("", 0) if rec.via is not None else rec.address
        self.courier.send(rec.address, ServicesPayload(self.settings.swarm_id, *self.courier.stamp(), self.settings.limits.relay.volunteer,
                                                       *seen))

    def on_services(self, rec: PeerRecord, p: ServicesPayload) -> None:
        if p.swarm_id != self.settings.swarm_id:
            return
        if p.relay:
            self.relays[rec.node_id] = rec.tcp_port
        else:
            self.relays.pop(rec.node_id, None)
        try:
            ipaddress.IPv4Address(p.seen_host)
        except ValueError:
            return  # not an address: nothing to learn from it
        self.seen_by.pop(rec.node_id, None)  # re-inserted: the latest reports are kept when the oldest give way
        self.seen_by[rec.node_id] = (p.seen_host, p.seen_port)
        while len(self.seen_by) > MAX_SEEN:
            del self.seen_by[next(iter(self.seen_by))]
        if rec.node_id not in self._told:
            self.tell(rec)

    def forget(self, node_id: str) -> None:
        """A peer lost: no longer a relay for us. What it saw of us stays evidence of our NAT (bounded)."""
        self.relays.pop(node_id, None)
        self._told.pop(node_id, None)
        while len(self.seen_by) > MAX_SEEN:
            del self.seen_by[next(iter(self.seen_by))]

    def relay_candidates(self, exclude: str) -> list[str]:
        """Relay volunteers among our current peers that we reach directly, other than ``exclude``."""
        return [n for n in self.relays if n != exclude and (rec := self.table.get(n)) is not None and rec.via is None]

    def relay_address(self, node_id: str) -> tuple[str, int] | None:
        rec = self.table.get(node_id)
        port = self.relays.get(node_id)
        return (rec.address[0], port) if rec is not None and port is not None else None

    def mappings(self) -> set[tuple[str, int]]:
        return set(self.seen_by.values())

    def nat(self) -> str:
        """How our peers see us: ``unknown`` (nobody told us yet), ``none`` (at our bound address), ``mapped``
        (behind a NAT that keeps one mapping for all peers), ``symmetric`` (a different mapping per peer)."""
        seen = self.mappings()
        if not seen:
            return "unknown"
        if all(addr == self.bound for addr in seen) or (ipaddress.IPv4Address(self.bound[0]).is_unspecified
                                                       and len({a[1] for a in seen}) == 1 and self.bound[1] in {a[1] for a in seen}):
            return "none"
        return "mapped" if len(seen) == 1 else "symmetric"

    def behind_nat(self) -> bool:
        return self.nat() in ("mapped", "symmetric")
