"""Signed datagrams out: owns this run's session number, the message counter that every signed payload carries, and
the way each datagram goes: straight to its address, or wrapped for a relay when the peer there is one we reach only
through a relay volunteer (`forward`).

No two messages of one run carry the same (session, counter) pair, which is what receivers' replay checks rely on
(see `replay`). Sending stops quietly once the endpoint is closed: a stopping transport has nobody to tell.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from quinkgl_cli.transport.ipv8.community import SwarmCommunity
from quinkgl_cli.transport.ipv8.endpoint import GuardedUDPEndpoint
from quinkgl_cli.transport.ipv8.payloads import RelayedPayload

MAX_ROUTES = 1024  # relayed peers' addresses remembered; only peers met through a relay add one


class Courier:
    def __init__(self, community: SwarmCommunity, endpoint: GuardedUDPEndpoint, session: int, swarm_id: str) -> None:
        self._community = community
        self._endpoint = endpoint
        self.session = session
        self._swarm_id = swarm_id
        self._counter = 0
        # A relayed peer's address (where its relay sees it) -> (the relay's address, the relay's name for the peer)
        self._routes: OrderedDict[tuple[str, int], tuple[tuple[str, int], str]] = OrderedDict()

    def stamp(self) -> tuple[int, int]:
        """Session and counter for the next signed message."""
        self._counter += 1
        return self.session, self._counter

    def send(self, address: tuple[str, int], payload: Any) -> None:
        route = self._routes.get(address)
        if route is not None:
            self.send_relayed(route[0], route[1], payload)
        else:
            self.send_direct(address, payload)

    def send_direct(self, address: tuple[str, int], payload: Any) -> None:
        """Straight to ``address``, whatever route it has (an attempt to punch a way to a relayed peer)."""
        if self._endpoint.is_open():
            self._community.send_signed(address, payload)

    def send_relayed(self, relay: tuple[str, int], target: str, payload: Any) -> None:
        """``payload``, signed by us for the peer the relay at ``relay`` knows as ``target``, through that relay."""
        if self._endpoint.is_open():
            packet = self._community.pack_signed(payload)
            self._community.send_signed(relay, RelayedPayload(self._swarm_id, *self.stamp(), target, packet))

    def route(self, address: tuple[str, int], relay: tuple[str, int], target: str) -> None:
        """From now on, datagrams for ``address`` go through the relay at ``relay``, for its peer ``target``."""
        self._routes.pop(address, None)
        self._routes[address] = (relay, target)
        while len(self._routes) > MAX_ROUTES:
            self._routes.popitem(last=False)

    def unroute(self, address: tuple[str, int]) -> None:
        """Datagrams for ``address`` go straight there again (the peer answered directly, or was lost)."""
        self._routes.pop(address, None)

    def relayed(self, address: tuple[str, int]) -> bool:
        return address in self._routes
