"""The transport interface the node logic uses, and nothing else.

Two implementations keep the same behaviour: `ipv8` (the daemon) and `memory` (tests, the simulator).
Model bytes are opaque here: the node encodes them (`quinkgl_cli.wire`) and the transport checks size and digest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

ControlValue = str | int | float | bool | None


@dataclass(frozen=True)
class EncodedBody:
    """A control body already in its canonical form (`transport.common.encoded`, which checks it as a send does):
    a body sent unchanged to many peers, a node's fingerprint to every peer it discovers, is encoded once."""

    data: bytes


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    public_key: str  # hex of the peer's transport public key: its identity
    address: tuple[str, int] | None
    last_seen: float  # transport clock (monotonic seconds, virtual in the simulator)
    # Whether the transport has a reason to count this peer beyond its word (see `transport.ipv8.peers`): when
    # enough peers were named, `--min-peers` counts these only. The in-memory twin has no strangers: every peer is.
    trusted: bool = True


@dataclass(frozen=True)
class OutgoingUpdate:
    """What a node hands to `send_model`: encoded bytes plus the offer's metadata."""

    round: int
    payload: bytes
    sample_count: int
    encoding: str = "qgl-tensors/1"
    meta: dict[str, ControlValue] = field(default_factory=dict)


class DecodeSlot:
    """Where the first in-process recipient of a payload object leaves what it decoded the payload to, for the
    other recipients of that same object (the memory transport hands each recipient of one send the same bytes).
    The transport only creates and carries it; what goes in, under which ``key``, is the receiver's business
    (`node.exchange`), which must never hand out what it keeps here, only copies of it."""

    __slots__ = ("key", "value", "__weakref__")

    def __init__(self) -> None:
        self.key: object = None
        self.value: object = None


@dataclass(frozen=True)
class ModelReceived:
    """A verified update: its bytes matched the signed offer's size and digest."""

    sender: str  # node id
    round: int
    payload: bytes | bytearray  # IPv8 hands over its fetch buffer (a bytearray) without copying it
    sample_count: int
    encoding: str
    meta: dict[str, ControlValue]
    received_at: float
    digest: bytes = b""  # sha256 of ``payload`` when the transport has it (IPv8: the signed offer's, checked)
    # Shared by every recipient of this very ``payload`` object (`DecodeSlot`); None where bytes are a recipient's own
    shared: DecodeSlot | None = field(default=None, compare=False, repr=False)


class TransportEvents(Protocol):
    """Callbacks the transport invokes on the event loop. They must not block."""

    def on_peer_discovered(self, peer: PeerInfo) -> None: ...

    def on_peer_lost(self, peer: PeerInfo) -> None: ...

    def on_model(self, update: ModelReceived) -> None: ...

    def on_message(self, sender: str, kind: str, body: dict[str, ControlValue]) -> None: ...


@dataclass(frozen=True)
class TransferDone:
    """One model transfer that ended, well or not, as the transport saw it (what `Transport.on_transfer` gets).

    ``send``: a peer fetched this node's update; ``receive``: this node fetched a peer's. ``size`` is the update's
    size in bytes, ``seconds`` the exchange's wall time, ``path`` how the bytes went (``direct``, ``reverse``,
    ``relay``, ``udp``; ``memory`` in-process).
    """

    direction: Literal["send", "receive"]
    peer: str  # node id
    round: int
    size: int
    seconds: float
    path: Literal["direct", "reverse", "relay", "udp", "memory"]
    ok: bool


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    models_sent: int = 0
    models_received: int = 0
    dropped: int = 0


class Transport(ABC):
    node_id: str
    stats: TransportStats
    # Told of every model transfer that ends, on the event loop; must not block or raise. Set before `start`
    # (`quinkgl run --trace` does); the transport never needs it.
    on_transfer: Callable[[TransferDone], None] | None = None

    def report_transfer(self, done: TransferDone) -> None:
        if self.on_transfer is not None:
            self.on_transfer(done)

    @abstractmethod
    async def start(self, events: TransportEvents) -> None:
        """Bind, join the swarm and begin delivering events."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop within a bounded time; pending sends are abandoned."""

    @abstractmethod
    def peers(self) -> list[PeerInfo]:
        """Peers currently known and not lost."""

    @abstractmethod
    def send_model(self, peer_id: str, update: OutgoingUpdate) -> None:
        """Queue ``update`` for ``peer_id`` and return at once; failures are logged and counted, never raised."""

    def revoked(self) -> bool:
        """Whether this node's own key is on the swarm's revocation list in force: its peers refuse it, and the
        daemon stops. False where nothing can be revoked."""
        return False

    def named_peers(self) -> int:
        """How many peers the operator named to this transport (seeds), whose arrival `--min-peers` can wait for
        instead of counting any peer; 0 where every peer is trusted anyway."""
        return 0

    @abstractmethod
    def send_message(self, peer_id: str, kind: str, body: dict[str, ControlValue] | EncodedBody) -> None:
        """Send a small signed control message (fingerprints, shuffles, announcements); never blocks."""

    @abstractmethod
    def cut_off(self) -> list[str]:
        """Peers lost without a goodbye (gone silent: a network split, a crash) and not back, that the transport
        still remembers."""

    @abstractmethod
    def rejoin(self) -> int:
        """Reach out again, for a while, to the seeds and the peers cut off (the swarm fell apart); returns how
        many peers it knocks at. Never blocks."""
