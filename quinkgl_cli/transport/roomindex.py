"""Which transports of the in-memory network still have room for a peer, per swarm, in join order.

`transport.memory`'s introductions pick random transports with room, listed in join order; listing them by
scanning the network at every join made building a swarm quadratic (10,000 peers: 50 million checks). This keeps a
Fenwick tree over join slots per swarm, so that the count and the k-th transport with room (skipping a few) come
in O(log n) and the picks are the very ones the scan gave. Owns the slots and the trees only; the network says
when a transport's room may have changed (`mark`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar


class Joined(Protocol):
    node_id: str
    swarm_id: str


T = TypeVar("T", bound=Joined)


class RoomIndex(Generic[T]):
    def __init__(self) -> None:
        self.slot: dict[str, int] = {}  # node id -> join slot (its first join: a rejoin keeps its place)
        self.by_slot: list[T] = []
        self._open: dict[int, str] = {}  # slot -> the swarm it is counted in
        self._trees: dict[str, list[int]] = {}
        self._counts: dict[str, int] = {}
        self._cap = 0

    def place(self, t: T) -> None:
        slot = self.slot.setdefault(t.node_id, len(self.slot))
        if slot == len(self.by_slot):
            self.by_slot.append(t)
        else:
            self.by_slot[slot] = t
        if slot >= self._cap:
            self._grow()

    def mark(self, t: T, has_room: bool) -> None:
        slot = self.slot[t.node_id]
        current = self._open.get(slot)
        wanted = t.swarm_id if has_room else None
        if current == wanted:
            return
        if current is not None:
            self._add(current, slot, -1)
            del self._open[slot]
        if wanted is not None:
            self._add(wanted, slot, 1)
            self._open[slot] = wanted

    def has_room(self, node_id: str, swarm_id: str) -> bool:
        slot = self.slot.get(node_id)
        return slot is not None and self._open.get(slot) == swarm_id

    def count(self, swarm_id: str) -> int:
        return self._counts.get(swarm_id, 0)

    def select(self, swarm_id: str, rank: int, skip: Sequence[int] = ()) -> T:
        """The transport with room of join rank ``rank`` (0-based) in ``swarm_id``, not counting the sorted slots
        ``skip`` (each one with room)."""
        skipped = 0
        while True:
            slot = self._kth(swarm_id, rank + skipped)
            seen = bisect_right(skip, slot)
            if seen == skipped:
                return self.by_slot[slot]
            skipped = seen

    # -- the trees -------------------------------------------------------------------------------------------
    def _add(self, swarm_id: str, slot: int, delta: int) -> None:
        tree = self._trees.setdefault(swarm_id, [0] * (self._cap + 1))
        self._counts[swarm_id] = self._counts.get(swarm_id, 0) + delta
        i = slot + 1
        while i <= self._cap:
            tree[i] += delta
            i += i & -i

    def _kth(self, swarm_id: str, rank: int) -> int:
        tree = self._trees[swarm_id]
        pos, left = 0, rank + 1
        step = 1 << (self._cap.bit_length() - 1)
        while step:
            nxt = pos + step
            if nxt <= self._cap and tree[nxt] < left:
                pos = nxt
                left -= tree[nxt]
            step >>= 1
        return pos

    def _grow(self) -> None:
        self._cap = max(64, self._cap * 2)
        self._trees = {swarm: [0] * (self._cap + 1) for swarm in self._trees}
        self._counts = {}
        for slot, swarm in self._open.items():
            self._add(swarm, slot, 1)
