"""Peers lost to silence, remembered so that a swarm that fell apart can find itself again.

Owns the addresses of peers lost without a goodbye (``silence``: a network split, a crash; not those that said
goodbye, were refused, evicted or revoked), the newest ``MAX_REMEMBERED`` for ``FORGET_AFTER`` seconds, and the
knocking. A peer met again is forgotten here. Nothing is sent unless asked: `knock` (the node saw its swarm split,
`Transport.rejoin`) opens a window of ``KNOCK_FOR`` seconds in which every ``KNOCK_EVERY`` seconds an IPv8
introduction request goes to each remembered address not in the peer table; the seeds are walked to by
`membership` anyway whenever they are not peers. A remembered peer that answers is greeted like any contact
(signed hello, admission), so an address here only says where to knock.
"""

from __future__ import annotations

from collections import OrderedDict

from quinkgl_cli.transport.ipv8.community import SwarmCommunity
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.peers import PeerTable

MAX_REMEMBERED = 64  # peers lost to silence whose addresses are kept, the newest
FORGET_AFTER = 1800.0  # seconds a lost peer's address is kept
KNOCK_FOR = 300.0  # seconds a `knock` keeps knocking
KNOCK_EVERY = 3.0  # seconds between two knocks at one address


class Rejoin:
    def __init__(self, community: SwarmCommunity, table: PeerTable, guard: DestinationGuard) -> None:
        self.community = community
        self.table = table
        self.guard = guard
        self.lost: OrderedDict[str, tuple[tuple[str, int], float]] = OrderedDict()  # node id -> (address, when lost)
        self.until = float("-inf")  # knocking goes on until then
        self._knocked = float("-inf")

    def forget_peer(self, node_id: str, address: tuple[str, int], reason: str, now: float) -> None:
        """A peer left the table: remembered when it went silent, else (a goodbye, a refusal) not."""
        self.lost.pop(node_id, None)
        if reason == "silence" and self.guard.allows(address[0]):
            self.lost[node_id] = (address, now)
            while len(self.lost) > MAX_REMEMBERED:
                self.lost.popitem(last=False)

    def cut_off(self, now: float) -> list[str]:
        """Peers lost to silence and not back, oldest loss first."""
        self._expire(now)
        return list(self.lost)

    def knock(self, now: float) -> int:
        """Knock at the remembered peers for the next ``KNOCK_FOR`` seconds; how many addresses that is."""
        self._expire(now)
        self.until = now + KNOCK_FOR
        return len(self.lost)

    def tick(self, now: float) -> None:
        self._expire(now)
        if now >= self.until or now - self._knocked < KNOCK_EVERY or not self.lost:
            return
        self._knocked = now
        known = self.table.addresses()
        for address, _ in self.lost.values():
            if address not in known:
                self.community.walk_to(address)

    def _expire(self, now: float) -> None:
        for node_id, (_, when) in list(self.lost.items()):
            if self.table.get(node_id) is not None or now - when >= FORGET_AFTER:
                del self.lost[node_id]
