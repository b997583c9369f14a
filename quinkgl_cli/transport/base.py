"""The transport interface the node logic uses, and nothing else.

Two implementations keep the same behaviour: `ipv8` (the daemon) and `memory` (tests, the simulator).
Model bytes are opaque here: the node encodes them (`quinkgl_cli.wire`) and the transport checks size and digest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

ControlValue = str | int | float | bool | None


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    public_key: str  # hex of the peer's transport public key: its identity
    address: tuple[str, int] | None
    last_seen: float  # transport clock (monotonic seconds, virtual in the simulator)


@dataclass(frozen=True)
class OutgoingUpdate:
    """What a node hands to `send_model`: encoded bytes plus the offer's metadata."""

    round: int
    payload: bytes
    sample_count: int
    encoding: str = "qgl-tensors/1"
    meta: dict[str, ControlValue] = field(default_factory=dict)


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


class TransportEvents(Protocol):
    """Callbacks the transport invokes on the event loop. They must not block."""

    def on_peer_discovered(self, peer: PeerInfo) -> None: ...

    def on_peer_lost(self, peer: PeerInfo) -> None: ...

    def on_model(self, update: ModelReceived) -> None: ...

    def on_message(self, sender: str, kind: str, body: dict[str, ControlValue]) -> None: ...


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

    @abstractmethod
    def send_message(self, peer_id: str, kind: str, body: dict[str, ControlValue]) -> None:
        """Send a small signed control message (fingerprints, shuffles, announcements); never blocks."""
