"""The in-memory network under field conditions: every model transfer and control message is lost with
probability ``drop`` or arrives ``latency + size / bandwidth`` virtual seconds after it was sent.

A transfer's bandwidth is the slower end's (the sender's upload or the recipient's download, one figure per peer
drawn once); concurrent transfers do not share it (no congestion model). Introductions (IPv8's walk) stay
instantaneous and lossless: what is simulated is the traffic of rounds, not discovery. With no event loop running
(while the swarm is built) messages are queued for `MemoryNetwork.deliver_all` as in the lockstep simulator.

Each concern draws from its own seeded stream (loss, latency; per-peer bandwidth from a stream of the peer's own),
so turning one condition on does not change the draws of another. When a trace is replayed (`quinkgl_cli.sim.replay`)
its recorded transfer times and failures take the place of all three for models. Owns the draws, the delivery
scheduling and the count of messages lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from quinkgl_cli.sim.dist import Dist
from quinkgl_cli.transport.memory import MemoryNetwork


class FieldNetwork(MemoryNetwork):
    def __init__(self, clock: Callable[[], float], seed: int, latency: Dist, bandwidth: Dist | None,
                 drop: float) -> None:
        super().__init__(clock=clock, auto_deliver=True, seed=seed)
        self.latency = latency
        self.bandwidth = bandwidth
        self.drop = drop
        self.seed = seed
        self._drop_rng = random.Random(f"drop:{seed}")
        self._latency_rng = random.Random(f"latency:{seed}")
        self._bandwidths: dict[str, float] = {}
        # A recorded trace's transfers instead of the draws: (sender, recipient, round) -> seconds, None when lost.
        self.replay: Callable[[str, str, int], float | None] | None = None
        self.lost = 0  # messages lost (to ``drop``, or as the trace lost them)
        self.carried = 0  # messages delivered after a delay

    def peer_bandwidth(self, node_id: str) -> float | None:
        """Bytes per second of ``node_id``'s link (None: unlimited), drawn once from its own stream."""
        if self.bandwidth is None:
            return None
        if node_id not in self._bandwidths:
            self._bandwidths[node_id] = self.bandwidth.draw(random.Random(f"bandwidth:{self.seed}:{node_id}"))
        return self._bandwidths[node_id]

    def transfer_seconds(self, src: str, dst: str, size: int) -> float:
        """How long one message of ``size`` bytes takes from ``src`` to ``dst`` (draws its latency)."""
        seconds = self.latency.draw(self._latency_rng)
        rates = [r for r in (self.peer_bandwidth(src), self.peer_bandwidth(dst)) if r is not None]
        if rates:
            seconds += size / min(rates)
        return seconds

    def _transfer(self, src: str, dst: str, size: int, action: Callable[[], None], round_: int | None = None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._enqueue(action)  # building: no virtual time passes yet
            return
        if self.replay is not None:
            seconds = self.replay(src, dst, round_) if round_ is not None else 0.0
        elif self.drop > 0 and self._drop_rng.random() < self.drop:
            seconds = None
        else:
            seconds = self.transfer_seconds(src, dst, size)
        if seconds is None:
            self.lost += 1
            return
        self.carried += 1
        loop.call_later(seconds, action)
