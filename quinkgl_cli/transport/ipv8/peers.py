"""The peer table: who we know (name <-> key), where they are, which session they run, when we last heard
from them or said hello to them, and what each has proved. Pure bookkeeping, no I/O: `membership` decides who
gets in and who is lost.

Peers are keyed by their public key; the name the node sees is the node id the key claims, or, when another key
already holds that id (or it is held for a lost peer's key), an alias: the claimed id, ``~`` and the last 16 hex
of the key (`alias`). ``~`` is not allowed in a node id, so no key can claim an alias. In an open swarm a key that
claims another's id therefore gains nothing: both live, each under its own name, and each gets its own models
(on the wire a peer is still addressed by the id it claims, and by its key).

Keys cost nothing, so a peer is *trusted* only for a reason beyond its word: it is vouched for (it answers from
an address the operator named, a bootstrap peer or a same-host rendezvous entry, or it holds a certificate in a
certified swarm), or it proved itself by delivering a model whose bytes matched its signed offer. Fetching our
models proves nothing (anyone can). A full table keeps trusted peers: it makes room by evicting an untrusted one
that has had its grace period (the newest such, so long-lived peers stay), or any untrusted one for a vouched
newcomer, rather than refusing a late honest peer. Untrusted peers get offers only within a budget shared by all
of them (`outbox`), an untrusted peer that left several of our offers unfetched gets no more, and `--min-peers`
counts trusted peers only (`PeerInfo.trusted`) when the operator named enough peers to wait for: a crowd of
fresh keys can neither fill the table for good, nor soak up our uploads, nor start our rounds.

A node id belongs to the key that holds it, and stays that key's for a while after the peer is lost (``hold``
seconds, see `released_to`): another key claiming it meanwhile is refused, so a squatter cannot take the id of a
peer that restarts, drops off for a moment or said goodbye. Only a revocation frees it at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quinkgl_cli.transport.base import PeerInfo

ALIAS_MARK = "~"  # not allowed in a node id (`validation.is_node_id`): an alias can never be claimed


def alias(node_id: str, key: bytes) -> str:
    """The name of a key that claims ``node_id`` while another key holds it."""
    return f"{node_id}{ALIAS_MARK}{key.hex()[-16:]}"


@dataclass
class PeerRecord:
    node_id: str  # the name the node knows this peer by: the id it claims, or its alias
    key_bin: bytes
    mid: bytes
    address: tuple[str, int]
    tcp_port: int
    last_seen: float
    session: int
    public_key: Any = None
    first_seen: float = 0.0
    delivered: int = 0  # models it sent us that passed the digest check
    fetched: int = 0  # offers of ours it fetched
    unanswered: int = 0  # offers of ours it left unfetched (expired, declined, superseded) while unproven
    hello_sent: float = 0.0
    vouched: bool = False  # at an address the operator named, or certified
    last_offer: float = float("-inf")  # when we last offered it a model
    claimed: str = ""  # the node id it says it is (what goes on the wire to it); its name unless aliased
    via: str | None = None  # the relay peer its datagrams travel through (`forward`); None: straight to ``address``

    def __post_init__(self) -> None:
        if not self.claimed:
            self.claimed = self.node_id

    @property
    def proven(self) -> bool:
        return self.delivered > 0

    @property
    def trusted(self) -> bool:
        return self.vouched or self.proven

    def info(self) -> PeerInfo:
        return PeerInfo(self.node_id, self.key_bin.hex(), self.address, self.last_seen, trusted=self.trusted)


class PeerTable:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_node: dict[str, PeerRecord] = {}
        self._node_by_key: dict[bytes, str] = {}
        self._contact_hello: dict[bytes, float] = {}  # when we last greeted keys that are not peers (yet)
        self._released: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # node id -> its key, when it was lost

    def __len__(self) -> int:
        return len(self._by_node)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._by_node.values()))

    def get(self, node_id: str) -> PeerRecord | None:
        return self._by_node.get(node_id)

    def node_of(self, key: bytes) -> str | None:
        return self._node_by_key.get(key)

    def name_for(self, node_id: str, key: bytes, now: float, hold: float) -> str:
        """The name ``key`` gets when it claims ``node_id``: the id itself, unless another key holds it (in the table,
        or still held for it after it was lost), then the key's alias."""
        holder = self._by_node.get(node_id)
        owner = holder.key_bin if holder is not None else self.released_to(node_id, now, hold)
        return node_id if owner is None or owner == key else alias(node_id, key)

    def by_key(self, key: bytes) -> PeerRecord | None:
        node = self._node_by_key.get(key)
        return self._by_node.get(node) if node is not None else None

    def full(self) -> bool:
        return len(self._by_node) >= self.capacity

    def add(self, rec: PeerRecord) -> None:
        self._by_node[rec.node_id] = rec
        self._node_by_key[rec.key_bin] = rec.node_id
        self._released.pop(rec.node_id, None)
        rec.hello_sent = self._contact_hello.pop(rec.key_bin, rec.hello_sent)

    def remove(self, node_id: str, released_at: float | None = None) -> PeerRecord | None:
        """Forget ``node_id``; with ``released_at`` (the clock now) its key keeps the id for a while."""
        rec = self._by_node.pop(node_id, None)
        if rec is not None:
            self._node_by_key.pop(rec.key_bin, None)
            if released_at is not None:
                self._released.pop(node_id, None)
                self._released[node_id] = (rec.key_bin, released_at)
                while len(self._released) > 4 * self.capacity:  # only admitted peers get here: bounded by churn
                    self._released.popitem(last=False)
        return rec

    def released_to(self, node_id: str, now: float, hold: float) -> bytes | None:
        """The key a lost peer's ``node_id`` is still held for, or None once ``hold`` seconds have passed."""
        entry = self._released.get(node_id)
        if entry is None:
            return None
        if now - entry[1] >= hold:
            del self._released[node_id]
            return None
        return entry[0]

    def eviction_candidate(self, now: float, grace: float, vouched: bool = False) -> PeerRecord | None:
        """The untrusted peer to give way to a newcomer: past its grace period (any, for a ``vouched`` newcomer),
        the newest of those; None if every peer is trusted or still within its grace."""
        idle = [p for p in self._by_node.values() if not p.trusted and (vouched or now - p.first_seen >= grace)]
        return max(idle, key=lambda p: p.first_seen, default=None)

    def untrusted(self) -> int:
        return sum(not p.trusted for p in self._by_node.values())


    def addresses(self) -> set[tuple[str, int]]:
        return {p.address for p in self._by_node.values()}

    def hello_sent(self, key: bytes) -> float:
        rec = self.by_key(key)
        return rec.hello_sent if rec is not None else self._contact_hello.get(key, 0.0)

    def mark_hello(self, key: bytes, now: float) -> None:
        rec = self.by_key(key)
        if rec is not None:
            rec.hello_sent = now
            return
        self._contact_hello.pop(key, None)
        self._contact_hello[key] = now
        while len(self._contact_hello) > 4 * self.capacity:  # fresh keys cost nothing: contacts stay bounded
            del self._contact_hello[next(iter(self._contact_hello))]

    def clear(self) -> None:
        self._by_node.clear()
        self._node_by_key.clear()
        self._contact_hello.clear()
        self._released.clear()
