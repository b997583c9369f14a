"""Control messages through a relay, for peers that cannot exchange datagrams at all (a symmetric NAT and a
port-restricted one: punching cannot work between them, so they would never meet).

Owns three things. On a relay volunteer (``--relay``): passing on `RelayedPayload`s to the peer they name, bounded
per peer and overall (`settings.RelayLimits`), and telling each peer, now and then, some of its other peers
(`RosterPayload`: names and keys). On every node: opening a `ForwardedPayload` (where the relay sees its sender, and
the route for our replies, kept by the `Courier`), and, behind a NAT, greeting through the relay a peer a roster
named that has not reached us directly within ``introduce_after`` seconds (up to ``relayed_peers`` such peers: each
costs its relay our heartbeats).

A relayed message is a whole datagram its sender signed for us, with its own session and counter: the relay cannot
forge, alter or replay one (the signature and the replay check fail), only drop it. A peer met this way
(`PeerRecord.via`) is no relay for us, and is never asked to connect anywhere by the address the relay gave (no
reverse connection, no probe): all that goes there is a hello every ``PUNCH_EVERY`` seconds (for at most
``relayed_peers`` peers), which is how it turns into a direct peer the moment a datagram of its own reaches us
straight: through endpoint-independent NATs both ends' hellos open a direct way (punching, without waiting for IPv8
to introduce them); through a symmetric one they cost a datagram each.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quinkgl_cli import validation
from quinkgl_cli.transport.common import MAX_MESSAGE_BYTES, DropLog
from quinkgl_cli.transport.ipv8.community import signer
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.payloads import ForwardedPayload, RelayedPayload, RosterPayload
from quinkgl_cli.transport.ipv8.peers import ALIAS_MARK, PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.ratelimit import RateLimit
from quinkgl_cli.transport.ipv8.services import Services
from quinkgl_cli.transport.ipv8.settings import TransportSettings

MAX_PACKET = MAX_MESSAGE_BYTES + 4096  # a control message and its headers, key and signature
ROSTER_EVERY = 10.0  # seconds between a relay's rosters to one peer (the first goes out at first sight)
ROSTER_SIZE = 16  # peers named in one roster; the next one names the next ones
RETRY = 5.0  # seconds between relayed greetings to one peer that has not answered
FORGET = 3 * ROSTER_EVERY  # a candidate no roster named for this long has left its relay
PUNCH_EVERY = 2.0  # seconds between hellos straight to a relayed peer


@dataclass
class _Candidate:
    name: str  # the relay's name for it
    relay: str  # the relay's node id
    listed: float  # when a roster first named it
    last_listed: float  # when a roster last named it
    greeted: float = float("-inf")


def _name_ok(name: str) -> bool:
    """A node id, or a relay's alias for one (`peers.alias`)."""
    base, mark, tail = name.partition(ALIAS_MARK)
    return validation.is_node_id(base) and (not mark or (len(tail) == 16 and all(c in "0123456789abcdef" for c in tail)))


class Forwarder:
    def __init__(self, settings: TransportSettings, table: PeerTable, courier: Courier, services: Services,
                 drops: DropLog, own_key: bytes, hello: Callable[[], Any]) -> None:
        self.settings = settings
        self.table = table
        self.courier = courier
        self.services = services
        self.drops = drops
        self.own_key = own_key
        self.hello = hello  # a hello asking for a reply, freshly stamped
        relay = settings.limits.relay
        self._per_peer = RateLimit(relay.messages, int(2 * relay.messages))
        self._all = RateLimit(relay.messages_total, int(2 * relay.messages_total))
        self._punched: dict[str, float] = {}  # relayed peer -> when we last sent it a hello straight
        self._rostered: dict[str, tuple[float, int]] = {}  # peer -> (when we last sent it a roster, where the next starts)
        self.candidates: OrderedDict[bytes, _Candidate] = OrderedDict()  # key -> a peer to meet through a relay
        self.forwarded = 0  # messages passed on for our peers

    # -- as a relay ------------------------------------------------------------------------------------------------
    def on_relayed(self, rec: PeerRecord, p: RelayedPayload) -> None:
        """``rec`` asks us to pass a packet on to our peer ``p.target``."""
        if not self.settings.limits.relay.volunteer or p.swarm_id != self.settings.swarm_id:
            self.drops("relay-refused", rec.node_id, "not_a_relay")
            return
        target = self.table.get(p.target)
        if rec.via is not None or target is None or target is rec or target.via is not None:
            self.drops("relay-refused", rec.node_id, "unknown_target")  # and never a chain of relays
            return
        if len(p.packet) > MAX_PACKET:
            self.drops("relay-refused", rec.node_id, "oversized", size=len(p.packet))
            return
        now = time.monotonic()
        if not (self._per_peer.allow(rec.node_id, now) and self._all.allow("-", now)):
            self.drops("relay-refused", rec.node_id, "rate_limited")
            return
        self.forwarded += 1
        self.courier.send(target.address, ForwardedPayload(self.settings.swarm_id, *self.courier.stamp(), rec.node_id,
                                                           rec.address[0], rec.address[1], p.packet))

    def tick(self, now: float) -> None:
        if self.settings.limits.relay.volunteer:
            direct = [rec for rec in self.table if rec.via is None]
            for rec in direct:
                told, start = self._rostered.get(rec.node_id, (float("-inf"), 0))
                if now - told >= ROSTER_EVERY:
                    self._roster(rec, [o for o in direct if o is not rec], start, now)
        if self.services.behind_nat():
            self._greet(now)
        for rec in self.table:
            if rec.via is not None and now - self._punched.get(rec.node_id, float("-inf")) >= PUNCH_EVERY:
                self._punched[rec.node_id] = now
                self.courier.send_direct(rec.address, self.hello())

    def _roster(self, rec: PeerRecord, others: list[PeerRecord], start: int, now: float) -> None:
        self._rostered[rec.node_id] = (now, start + ROSTER_SIZE)
        if not others:
            return
        named = [others[(start + i) % len(others)] for i in range(min(ROSTER_SIZE, len(others)))]
        self.courier.send(rec.address, RosterPayload(self.settings.swarm_id, *self.courier.stamp(),
                                                     [o.node_id.encode() for o in named], [o.key_bin for o in named]))

    def forget(self, node_id: str) -> None:
        self._rostered.pop(node_id, None)
        self._punched.pop(node_id, None)
        self._per_peer.forget(node_id)

    # -- as a peer of a relay --------------------------------------------------------------------------------------
    def on_roster(self, rec: PeerRecord, p: RosterPayload) -> None:
        if p.swarm_id != self.settings.swarm_id or rec.via is not None or len(p.peer_names) != len(p.peer_keys):
            self.drops("roster-refused", rec.node_id, "malformed")
            return
        now = time.monotonic()
        for raw, key in zip(p.peer_names, p.peer_keys, strict=True):
            name = raw.decode("utf-8", "replace")
            if key == self.own_key or not _name_ok(name) or len(key) > 128:
                continue
            known = self.candidates.get(key)
            if known is not None and known.relay == rec.node_id:
                known.last_listed, known.name = now, name
                continue
            if known is not None and self.table.get(known.relay) is not None:
                continue  # another relay of ours named it first: its clock keeps running
            self.candidates.pop(key, None)
            self.candidates[key] = _Candidate(name, rec.node_id, now, now)
        while len(self.candidates) > 4 * self.table.capacity:
            self.candidates.popitem(last=False)

    def _greet(self, now: float) -> None:
        """Greet, through their relay, the peers rosters named that never reached us directly."""
        limits = self.settings.limits
        room = not self.table.full() and sum(rec.via is not None for rec in self.table) < limits.forward.relayed_peers
        for key, c in list(self.candidates.items()):
            relay = self.table.get(c.relay)
            if self.table.by_key(key) is not None or now - c.last_listed > FORGET or relay is None or relay.via is not None:
                del self.candidates[key]  # met, gone from its relay, or the relay is gone
            elif room and now - c.listed >= limits.forward.introduce_after and now - c.greeted >= RETRY:
                c.greeted = now
                self.courier.send_relayed(relay.address, c.name, self.hello())

    def open(self, relay: PeerRecord, p: ForwardedPayload) -> tuple[str, int] | None:
        """Where the sender of a packet ``relay`` forwarded sits, with our replies routed through ``relay``; None
        (logged) when the packet may not be taken."""
        if p.swarm_id != self.settings.swarm_id or relay.via is not None:
            self.drops("forward-refused", relay.node_id, "chained" if relay.via is not None else "other_swarm")
            return None
        try:
            seen = (str(ipaddress.IPv4Address(p.seen_host)), p.seen_port)
        except ValueError:
            seen = None
        key = signer(p.packet)
        if seen is None or not seen[1] or len(p.packet) > MAX_PACKET or not _name_ok(p.origin) or key == self.own_key:
            self.drops("forward-refused", relay.node_id, "malformed")
            return None
        known = self.table.by_key(key)
        if known is not None and known.via is None:
            return seen  # a direct peer's packet that came the long way: our replies still go straight to it
        if any(rec.address == seen and rec.via is None for rec in self.table):
            self.drops("forward-refused", relay.node_id, "address_taken")  # that address is a direct peer's
            return None
        self.courier.route(seen, relay.address, p.origin)
        return seen
