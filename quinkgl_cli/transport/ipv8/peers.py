"""The peer table: who we know (node id <-> key), where they are, which session they run, and when we last heard
from them or said hello to them. Pure bookkeeping, no I/O: `membership` decides who gets in and who is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quinkgl_cli.transport.base import PeerInfo


@dataclass
class PeerRecord:
    node_id: str
    key_bin: bytes
    mid: bytes
    address: tuple[str, int]
    tcp_port: int
    last_seen: float
    session: int
    public_key: Any = None

    def info(self) -> PeerInfo:
        return PeerInfo(self.node_id, self.key_bin.hex(), self.address, self.last_seen)


class PeerTable:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_node: dict[str, PeerRecord] = {}
        self._node_by_key: dict[bytes, str] = {}
        self._hello_sent: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._by_node)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._by_node.values()))

    def get(self, node_id: str) -> PeerRecord | None:
        return self._by_node.get(node_id)

    def node_of(self, key: bytes) -> str | None:
        return self._node_by_key.get(key)

    def by_key(self, key: bytes) -> PeerRecord | None:
        node = self._node_by_key.get(key)
        return self._by_node.get(node) if node is not None else None

    def full(self) -> bool:
        return len(self._by_node) >= self.capacity

    def add(self, rec: PeerRecord) -> None:
        self._by_node[rec.node_id] = rec
        self._node_by_key[rec.key_bin] = rec.node_id

    def remove(self, node_id: str) -> PeerRecord | None:
        rec = self._by_node.pop(node_id, None)
        if rec is not None:
            self._node_by_key.pop(rec.key_bin, None)
            self._hello_sent.pop(rec.key_bin, None)
        return rec

    def addresses(self) -> set[tuple[str, int]]:
        return {p.address for p in self._by_node.values()}

    def hello_sent(self, key: bytes) -> float:
        return self._hello_sent.get(key, 0.0)

    def mark_hello(self, key: bytes, now: float) -> None:
        self._hello_sent[key] = now

    def clear(self) -> None:
        self._by_node.clear()
        self._node_by_key.clear()
        self._hello_sent.clear()
