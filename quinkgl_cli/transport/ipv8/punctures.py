"""How often IPv8's puncture requests may make this node send: they name any address and are not signed, and IPv8
sends a puncture there at once.

A puncture request is how an introducer asks us to open our NAT towards a peer it introduced us to. Anyone holding
the swarm key (every member; a revoked one too) could otherwise aim this node's datagrams at a third party, one
puncture per request and up to the gate's budget for strangers: 166 punctures reached a UDP port of the
attacker's choice from 400 requests in 12 s, measured against a real daemon. A real peer's NAT mapping lives far
longer than `GAP_S`, so one puncture per target in that time opens it as well, and the total is bounded too.
"""

from __future__ import annotations

from quinkgl_cli.transport.ipv8.ratelimit import Cooldown, RateLimit

GAP_S = 5.0  # one puncture per target address in this long
PER_SECOND = 5.0  # punctures to all targets together, sustained
BURST = 10  # and at once


class PunctureLimit:
    def __init__(self, gap: float = GAP_S, rate: float = PER_SECOND, burst: int = BURST) -> None:
        self._each = Cooldown(gap)
        self._all = RateLimit(rate, burst)

    def allow(self, target: tuple[str, int], now: float) -> bool:
        """Whether to send a puncture to ``target`` now; counts it if so."""
        return self._each.allow(target, now) and self._all.allow("-", now)
