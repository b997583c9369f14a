"""What an IPv8 transport was asked to be: its validated settings, the resource limits, and the node-id rules.

Owns nothing that changes while the transport runs. `TransportSettings` is checked once, at construction, so a bad
flag fails before any socket is opened; `Limits` are the bounds no peer (or crowd of fresh identities) can push
past, kept apart so tests can shrink them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.transport.common import DEFAULT_MAX_MODEL_BYTES, DEFAULT_MAX_PEERS, PROTOCOL_VERSION
from quinkgl_cli.transport.ipv8.endpoint import is_loopback

MAX_NODE_ID = 128


def valid_node_id(node_id: str) -> bool:
    return 0 < len(node_id) <= MAX_NODE_ID and node_id.isprintable() and not any(c.isspace() or c == "=" for c in node_id)


def label(node_id: str, source: tuple[str, int]) -> str:
    """How a log line names the sender of a hello: its node id, unless that is unfit for a log line."""
    return node_id if valid_node_id(node_id) else f"{source[0]}:{source[1]}"


def parse_address(value: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port`` (or a tuple) to a tuple; raises NetworkError with what is wrong."""
    if isinstance(value, tuple):
        host, port = value
    else:
        host, sep, port_text = str(value).strip().rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise NetworkError(f"bootstrap peer {value!r} is not host:port", "e.g. --bootstrap-peer 127.0.0.1:7001")
        port = int(port_text)
        host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise NetworkError(f"bootstrap peer {value!r} has port {port} outside 1-65535")
    return str(host), int(port)


@dataclass(frozen=True)
class Limits:
    """Resource bounds. Each one caps what a single sender, or all senders together, can make us hold."""

    serve_slots: int = 16  # TCP fetches we serve at once
    serve_slots_per_peer: int = 2  # of those, held by one recipient
    handshake_timeout: float = 2.0  # an unauthenticated TCP connection must prove itself within this
    pending_handshakes: int = 64  # connections still proving themselves; beyond this, new ones are closed at once
    pending_offers_per_peer: int = 8  # offers we keep for a peer that has not fetched them
    fetch_queue_per_peer: int = 4  # accepted offers waiting for a fetch slot, per sender
    fetch_queue_total: int = 64  # and from all senders together
    offers_per_second: float = 20.0  # offers we accept from one sender, sustained
    offer_burst: int = 40  # and in one burst
    min_rate: int = 1024 * 1024  # bytes/s a transfer may drop to (over its whole length) before it is abandoned
    stall_window: float = 2.0  # seconds over which a fetch's progress is measured against ``stall_rate``
    stall_rate: int = 64 * 1024  # bytes/s below which, over ``stall_window``, a fetch is stalled and abandoned
    offer_resends: int = 3
    offer_resend_after: float = 1.5  # seconds without a fetch before an offer is sent again (a datagram may be lost)
    proven_after: float = 30.0  # seconds of presence after which an unproven peer counts as long-lived
    stop_grace: float = 2.0  # seconds a stopping transport waits for peers to fetch what it offered them


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
        node_id = self.node_id
        if not node_id or len(node_id) > MAX_NODE_ID or any(c.isspace() or c == "=" for c in node_id):
            raise NetworkError(f"node id {node_id!r} is invalid", f"use 1-{MAX_NODE_ID} characters without spaces or '='")
        try:
            version = ipaddress.ip_address(self.listen_host).version
        except ValueError as exc:
            raise NetworkError(f"listen address {self.listen_host!r} is not an IP address", "e.g. --listen 127.0.0.1 or 0.0.0.0") from exc
        if version != 4:
            raise NetworkError(f"listen address {self.listen_host!r} is not IPv4", "IPv6 is not supported yet")
        if not 0 <= self.port < 65536:
            raise NetworkError(f"port {self.port} is outside 0-65535")
        if self.max_model_bytes <= 0:
            raise NetworkError("max model bytes must be positive")
        loopback_only = is_loopback(self.listen_host)
        if (self.enable_lan_discovery or self.enable_public_bootstrap) and loopback_only:
            raise NetworkError(
                "LAN discovery and public bootstrap servers need a non-loopback listen address",
                "add --listen 0.0.0.0 (or this host's LAN address)",
            )
        for host, bport in self.bootstrap:
            if loopback_only and not is_loopback(host):
                raise NetworkError(
                    f"bootstrap peer {host}:{bport} is not on loopback, but this node listens on {self.listen_host}",
                    "listen on a reachable address, e.g. --listen 0.0.0.0",
                )
