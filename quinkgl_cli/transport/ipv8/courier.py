"""Signed datagrams out: owns this run's session number and the message counter that every signed payload carries.

No two messages of one run carry the same (session, counter) pair, which is what receivers' replay checks rely on
(see `replay`). Sending stops quietly once the endpoint is closed: a stopping transport has nobody to tell.
"""

from __future__ import annotations

from typing import Any

from quinkgl_cli.transport.ipv8.community import SwarmCommunity
from quinkgl_cli.transport.ipv8.endpoint import GuardedUDPEndpoint


class Courier:
    def __init__(self, community: SwarmCommunity, endpoint: GuardedUDPEndpoint, session: int) -> None:
        self._community = community
        self._endpoint = endpoint
        self.session = session
        self._counter = 0

    def stamp(self) -> tuple[int, int]:
        """Session and counter for the next signed message."""
        self._counter += 1
        return self.session, self._counter

    def send(self, address: tuple[str, int], payload: Any) -> None:
        if self._endpoint.is_open():
            self._community.send_signed(address, payload)
