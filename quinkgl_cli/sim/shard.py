"""One shard of a sharded simulation: the whole swarm's memory network as one worker (a Ray actor) sees it, with
its own peers as real transports and every other peer as a ghost.

Every shard replays the same introductions (the ghosts join in the swarm's join order, with the same seed), so all
shards draw the same peer graph without talking. What a local peer sends a ghost leaves for the ghost's shard
(`quinkgl_cli.sim.shardwire`); what arrives from other shards is delivered to the local peers here.

The same results as one process: `MemoryNetwork.deliver_all` delivers in FIFO order, which is level by level
(everything sent by the driver's step, then everything those deliveries sent, ...). Here every delivery gets a key
(the global index of the peer whose step sent it, then its place among that step's sends; a delivery's own sends
extend its key), and a shard delivers one level per wave, in key order, so each peer receives its messages in the
order it would in one process. Between waves the driver moves the batches (`deliver_all` after a step or a join
delivers the current level; `seal` makes what it sent the next). Offers a peer of another shard delivered are
acknowledged to the sender's shard, which counts them in its sender's traffic, as one process does.

While the swarm is built, each join's introductions are delivered at once (they never cross shards) and what they
send waits for the waves after the last join: a peer then gets its introductions and the messages they cause in
the same order among each kind as in one process; the two kinds touch different state (the peer table and the
fingerprints a topology was told).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from quinkgl_cli.sim.shardwire import Batch, Key, Message
from quinkgl_cli.transport.base import OutgoingUpdate
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport, _Offer

Entry = tuple[Key, Callable[[], None]]


class ShardNetwork(MemoryNetwork):
    """The memory network of shard ``shard`` out of ``shards``; ``owners`` maps every node id to its shard."""

    def __init__(self, shard: int, shards: int, owners: dict[str, int], clock: Callable[[], float], seed: int) -> None:
        super().__init__(clock=clock, auto_deliver=False, seed=seed)
        self.shard = shard
        self.owners = owners
        self.outbox = [Batch() for _ in range(shards)]
        self.ghosts: dict[str, GhostTransport] = {}
        self._current: list[Entry] = []  # this level's deliveries
        self._next: list[Entry] = []  # what they send, for the next wave
        self._origin: Key = ()
        self._count = 0
        self._delivering = False
        self._routing: str | None = None
        self._forward_key: Key = ()

    # -- keys ----------------------------------------------------------------------------------------------
    def begin(self, index: int) -> None:
        """What follows is the driver's step of the peer (or join) with global index ``index``."""
        self._origin, self._count = (index,), 0

    @contextmanager
    def routing(self, peer_id: str) -> Iterator[None]:
        """A transport's send to ``peer_id`` happens inside: `_enqueue` needs to know where it goes."""
        self._routing = peer_id
        try:
            yield
        finally:
            self._routing = None

    def _enqueue(self, action: Callable[[], None]) -> None:
        key = self._origin + (self._count,)
        self._count += 1
        if self._routing is not None and self._routing in self.ghosts:
            self._forward_key = key
            action()  # the ghost's handler puts it in the outbox of its shard
            return
        (self._next if self._delivering else self._current).append((key, action))

    # -- driving -------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._current) + len(self._next)

    def deliver_all(self, limit: int | None = None) -> int:
        """Deliver this level in key order; what the deliveries send waits for `seal` (``limit`` is not supported)."""
        if limit is not None:
            raise ValueError("a shard delivers whole levels")
        batch = sorted(self._current, key=lambda entry: entry[0])
        self._current = []
        self._delivering = True
        try:
            for key, action in batch:
                self._origin, self._count = key, 0
                action()
        finally:
            self._delivering = False
            self._origin, self._count = (), 0
        return len(batch)

    def seal(self) -> tuple[int, list[Batch]]:
        """End a wave: what this level sent becomes the next one; then `take`."""
        self._current, self._next = self._next, []
        return self.take()

    def take(self) -> tuple[int, list[Batch]]:
        """(entries still to deliver anywhere, the outbox per shard with its acknowledgements); empties the outbox."""
        for ghost in self.ghosts.values():
            stats = ghost.stats
            if stats.models_sent or stats.bytes_sent:
                box = self.outbox[self.owners[ghost.node_id]]
                size, models = box.acks.get(ghost.node_id, (0, 0))
                box.acks[ghost.node_id] = (size + stats.bytes_sent, models + stats.models_sent)
                stats.bytes_sent = stats.models_sent = 0
        out, self.outbox = self.outbox, [Batch() for _ in self.outbox]
        return len(self._current) + sum(len(b) for b in out), out

    def ingest(self, batch: Batch) -> None:
        """Deliveries from another shard join this level; acknowledgements count in their senders' traffic."""
        for sender, (size, models) in batch.acks.items():
            stats = self._transports[sender].stats
            stats.bytes_sent += size
            stats.models_sent += models
        for key, offer in batch.offers:
            target, ghost = self._transports[offer.recipient], self.ghosts[offer.sender]
            self._current.append((key, _bind_offer(target, ghost, offer)))
        for key, msg in batch.messages:
            target = self._transports[msg.recipient]
            self._current.append((key, _bind_message(target, msg)))

    # -- what ghosts forward -------------------------------------------------------------------------------
    def forward_offer(self, offer: _Offer) -> None:
        self.outbox[self.owners[offer.recipient]].offers.append((self._forward_key, offer))

    def forward_message(self, message: Message) -> None:
        self.outbox[self.owners[message.recipient]].messages.append((self._forward_key, message))


def _bind_offer(target: MemoryTransport, sender: MemoryTransport, offer: _Offer) -> Callable[[], None]:
    return lambda: target._offer_from(sender, offer)


def _bind_message(target: MemoryTransport, msg: Message) -> Callable[[], None]:
    return lambda: target._message_from(msg.sender, msg.kind, msg.data)


class ShardTransport(MemoryTransport):
    """A local peer's transport: its sends say where they go, so one to a ghost leaves the shard."""

    network: ShardNetwork

    def _offer(self, peer_id: str, update: OutgoingUpdate, meta: bytes) -> None:
        with self.network.routing(peer_id):
            super()._offer(peer_id, update, meta)

    def _deliver(self, peer_id: str, kind: str, data: bytes) -> None:
        with self.network.routing(peer_id):
            super()._deliver(peer_id, kind, data)


class GhostTransport(MemoryTransport):
    """A peer of another shard: it joins (so introductions are drawn as in one process) but holds no peer table,
    and whatever is delivered to it is forwarded to its shard."""

    network: ShardNetwork

    def __init__(self, network: ShardNetwork, node_id: str, **kwargs: Any) -> None:
        super().__init__(network, node_id, **kwargs)
        network.ghosts[node_id] = self

    def join(self) -> None:
        self.running = True
        self.network._join(self)

    def _hello_from(self, other: MemoryTransport) -> None:
        return  # its own shard's replica of the introduction makes the real peer meet ``other``

    def _offer_from(self, sender: MemoryTransport, offer: _Offer) -> None:
        self.network.forward_offer(offer)

    def _message_from(self, sender: str, kind: str, data: bytes) -> None:
        self.network.forward_message(Message(sender, self.node_id, kind, data))


def owners_of(ids: Sequence[str], shards: int) -> dict[str, int]:
    """Contiguous blocks of the join order, as even as they divide: shard ``s`` holds its ``s``-th block."""
    n = len(ids)
    return {node_id: min(shards - 1, i * shards // n) for i, node_id in enumerate(ids)}
