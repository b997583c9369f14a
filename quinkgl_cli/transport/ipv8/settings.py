"""What an IPv8 transport was asked to be: its validated settings, the resource limits, and the node-id rules.

Owns nothing that changes while the transport runs. `TransportSettings` is checked once, at construction, so a bad
flag fails before any socket is opened; `Limits` are the bounds no peer (or crowd of fresh identities) can push
past, kept apart so tests can shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quinkgl_cli import validation
from quinkgl_cli.errors import NetworkError, UsageError
from quinkgl_cli.transport.common import DEFAULT_MAX_MODEL_BYTES, DEFAULT_MAX_PEERS, PROTOCOL_VERSION


def label(node_id: str, source: tuple[str, int]) -> str:
    """How a log line names the sender of a hello: its node id, unless that is unfit for a log line."""
    return node_id if validation.is_node_id(node_id) else f"{source[0]}:{source[1]}"


def parse_address(value: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port`` (or a tuple) to a tuple; raises NetworkError with what is wrong."""
    text = f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)
    try:
        return validation.peer_address(text, "bootstrap peer")
    except UsageError as exc:
        raise NetworkError(exc.message, exc.hint) from exc


@dataclass(frozen=True)
class RelayLimits:
    """What this node relays for peers that cannot connect to each other: nothing unless it volunteers."""

    volunteer: bool = False  # --relay
    pairs: int = 8  # transfers carried at once
    waiting: int = 32  # connections waiting for the other end of their transfer
    wait: float = 5.0  # seconds one waits before the relay gives up on its partner
    rate: int = 50_000_000  # bytes/s carried, all transfers together (--relay-rate, in MB/s)
    messages: float = 50.0  # control messages a second passed on for one peer (`forward`), sustained
    messages_total: float = 500.0  # and for all peers together


@dataclass(frozen=True)
class ForwardLimits:
    """Which peers a node behind a NAT meets through a relay (`forward`), when they cannot reach it directly."""

    # Seconds a peer a relay told us of has to reach us directly (punching takes an introduction or two) before we
    # greet it through the relay instead.
    introduce_after: float = 2.0
    relayed_peers: int = 8  # peers we reach only through a relay, at most: each costs the relay our heartbeats


@dataclass(frozen=True)
class StrangerLimits:
    """What peers we have no reason to trust (untrusted peers and keys not in the table, see `peers`) may take; and,
    since keys cost nothing, how often any key may join the table."""

    grace: float = 30.0  # seconds a new peer has to prove itself before it may be evicted from a full table
    probation_offers: int = 4  # offers an untrusted peer may leave unfetched before it gets no more
    free: int = 16  # untrusted peers that get offers as trusted ones do
    offer_rate: float = 8.0  # beyond that many, offers per second to all untrusted peers together
    # Packets per second we spend a signature check on from keys we do not trust, all together, and from one
    # untrusted peer; trusted peers and named addresses have no limit. A flood beyond these is dropped at the cost of
    # a lookup (`gate`), so it cannot back up our UDP receive queue, where it would delay every honest datagram by
    # tens of seconds (measured with 300 fresh keys).
    packets: float = 100.0
    packets_per_peer: float = 20.0
    # A key joins the table (new, restarted, renamed, back after a loss) at most this often: a restart or two in a
    # row pass, a key that comes back under a new session or name at every hello does not.
    joins_per_key: int = 3
    joins_window: float = 30.0


@dataclass(frozen=True)
class Limits:
    """Resource bounds. Each one caps what a single sender, or all senders together, can make us hold."""

    serve_slots: int = 16  # TCP fetches we serve at once
    serve_slots_per_peer: int = 2  # of those, held by one recipient
    handshake_timeout: float = 2.0  # an unauthenticated TCP connection must prove itself within this
    pending_handshakes: int = 64  # connections still proving themselves; beyond this, new ones are closed at once
    pending_offers_per_peer: int = 8  # offers we keep for a peer that has not fetched them
    fetch_queue_per_peer: int = 4  # accepted offers waiting for a fetch slot, per sender
    fetch_queue_total: int = 256  # and from all senders together (a fan-in round from a full peer table fits)
    offers_per_second: float = 20.0  # offers we accept from one sender, sustained
    offer_burst: int = 40  # and in one burst
    min_rate: int = 1024 * 1024  # bytes/s a transfer may drop to (over its whole length) before it is abandoned
    stall_window: float = 2.0  # seconds over which a fetch's progress is measured against ``stall_rate``
    stall_rate: int = 64 * 1024  # bytes/s below which, over ``stall_window``, a fetch is stalled and abandoned
    offer_resends: int = 3
    offer_resend_after: float = 1.5  # seconds without a fetch before an offer is sent again (a datagram may be lost)
    stop_grace: float = 2.0  # seconds a stopping transport waits for peers to fetch what it offered them
    id_hold: float = 120.0  # seconds a lost peer's node id stays its key's: nobody else may claim it meanwhile
    path_retry_after: float = 300.0  # seconds before a way to a peer that failed is tried again
    forward: ForwardLimits = field(default_factory=lambda: ForwardLimits())
    relay: RelayLimits = field(default_factory=lambda: RelayLimits())
    strangers: StrangerLimits = field(default_factory=lambda: StrangerLimits())


@dataclass(frozen=True)
class TransportSettings:
    node_id: str
    swarm_id: str
    arch_hash: str
    state_dir: Path
    listen_host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[tuple[str, int], ...] = ()
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    enable_public_bootstrap: bool = False
    enable_lan_discovery: bool = False
    walk_interval: float = 0.5
    heartbeat_interval: float = 2.0
    silence_timeout: float = 12.0
    connect_timeout: float = 3.0
    fetch_timeout: float = 10.0
    offer_ttl: float = 60.0
    max_peers: int = DEFAULT_MAX_PEERS
    max_concurrent_fetches: int = 4
    protocol_version: int = PROTOCOL_VERSION
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        """The rules `quinkgl_cli.validation` states, as NetworkErrors: an embedder's bad settings fail here."""
        try:
            validation.node_id(self.node_id, "node id")
            object.__setattr__(self, "listen_host", validation.listen_address(self.listen_host, "listen address"))
            validation.listen_port(self.port, "port")
            validation.reachable_peers(self.listen_host, self.bootstrap, lan_discovery=self.enable_lan_discovery,
                                       public_bootstrap=self.enable_public_bootstrap)
        except UsageError as exc:
            raise NetworkError(exc.message, exc.hint) from exc
        if self.max_model_bytes <= 0:
            raise NetworkError("max model bytes must be positive")
