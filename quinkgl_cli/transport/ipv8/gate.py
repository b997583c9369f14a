"""Which datagrams earn a signature check: a verify costs far more than reading the key a packet names, so packets
from keys we do not trust are budgeted before it.

Trusted peers (see `peers`) and the addresses the operator named (bootstrap peers, rendezvous entries) always pass;
strangers (keys not in the table) and untrusted peers share one budget, and each untrusted peer has its own as
well; and while our UDP receive queue is more than ``SHED_ABOVE`` full (we read slower than packets come), they do
not pass at all. A flood of fresh keys, or of one member's offers, is then dropped at the cost of a lookup per packet
instead of filling that queue, where every honest datagram would wait behind it (tens of seconds, measured with 300
fresh keys against a daemon on a loaded machine), while a swarm that is not flooded never sheds anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.peers import PeerTable
from quinkgl_cli.transport.ipv8.ratelimit import RateLimit
from quinkgl_cli.transport.ipv8.settings import Limits

SHED_ABOVE = 0.25  # of the receive buffer: a quarter is already thousands of datagrams waiting
BACKLOG_EVERY = 0.05  # seconds a reading of the queue is reused (it is a system call)


class PacketGate:
    def __init__(self, limits: Limits, table: PeerTable, drops: DropLog, named: frozenset[tuple[str, int]],
                 backlog: Callable[[], float] = lambda: 0.0) -> None:
        self.table = table
        self.backlog = backlog
        self._behind = (float("-inf"), False)  # (when read, whether the queue was over SHED_ABOVE)
        self.drops = drops
        self.named = named  # replaced by membership whenever it reads the rendezvous directory
        strangers = limits.strangers
        self._shared = RateLimit(strangers.packets, int(2 * strangers.packets))
        self._per_peer = RateLimit(strangers.packets_per_peer, int(2 * strangers.packets_per_peer))

    def admits(self, source: tuple[str, int], signer: bytes) -> bool:
        """Whether a packet from ``source`` naming ``signer`` (unchecked yet) is worth its signature check."""
        now = time.monotonic()
        rec = self.table.by_key(signer)
        if rec is not None and rec.trusted or rec is None and source in self.named:
            return True
        if self._is_behind(now):
            reason = "overloaded"
        elif (rec is None or self._per_peer.allow(rec.node_id, now)) and self._shared.allow("-", now):
            return True
        else:
            reason = "rate_limited"
        self.drops("packet-refused", "-" if rec is None else rec.node_id, reason,
                   sender="stranger" if rec is None else "untrusted")
        return False

    def _is_behind(self, now: float) -> bool:
        read_at, behind = self._behind
        if now - read_at >= BACKLOG_EVERY:
            behind = self.backlog() > SHED_ABOVE
            self._behind = (now, behind)
        return behind

    def forget(self, node_id: str) -> None:
        self._per_peer.forget(node_id)
