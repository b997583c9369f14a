"""A token bucket per peer: how the transport bounds what any one peer (or all strangers together) can make it do."""

from __future__ import annotations


class RateLimit:
    """A token bucket per sender: ``burst`` offers at once, then ``rate`` a second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when counted)

    def allow(self, sender: str, now: float) -> bool:
        tokens, then = self._buckets.get(sender, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now)
            return False
        self._buckets[sender] = (tokens - 1.0, now)
        return True

    def forget(self, sender: str) -> None:
        self._buckets.pop(sender, None)
