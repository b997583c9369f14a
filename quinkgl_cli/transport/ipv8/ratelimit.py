"""A token bucket per peer: how the transport bounds what any one peer (or all strangers together) can make it do."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


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


class Cooldown:
    """At most ``count`` events per key in any ``gap`` seconds. A key whose newest event is older than ``gap`` is
    forgotten, so it holds no more keys than events can happen in ``gap``, however many keys there are."""

    def __init__(self, gap: float, count: int = 1) -> None:
        self.gap = gap
        self.count = count
        self._events: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> its events' times; oldest newest first

    def allow(self, key: Hashable, now: float) -> bool:
        """Whether an event for ``key`` may happen now; remembers it if so."""
        while self._events and now - next(iter(self._events.values()))[-1] >= self.gap:
            self._events.popitem(last=False)
        recent = [t for t in self._events.get(key, ()) if now - t < self.gap]
        if len(recent) >= self.count:
            return False
        self._events[key] = [*recent, now]
        self._events.move_to_end(key)
        return True
