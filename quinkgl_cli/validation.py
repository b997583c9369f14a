"""The one place that decides what a node id, a listen address, a port and a peer address may be.

Every layer that takes one of these (the CLI's flags, the manifest's `bootstrap_peers`, the node, the
transports) asks here, so a value refused by one is refused by all, and a bad flag is a usage error (exit 1)
before anything starts instead of a failure deep in the transport.

The rules:

- node id: 1-64 characters, letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit; it names
  the peer in log lines and travels in hellos, so it never holds spaces, ``=`` or control characters;
- listen address: an IPv4 address (IPv6 is not supported by the transport yet) or ``localhost``;
- port: 0-65535 to listen on (0: any free port), 1-65535 to send to;
- peer address: ``host:port``, the host an IPv4 address or a name (names are resolved when the node starts);
- ``localhost`` means 127.0.0.1 wherever an address is taken, without asking a resolver (RFC 6761 reserves
  the name for loopback; a hosts file that maps it elsewhere must not widen where a loopback node sends);
- loopback rule: a node listening on loopback never sends anywhere else, so every peer it is given must be a
  loopback address, and LAN discovery or public bootstrap servers need a non-loopback listen address.

Only the standard library: the manifest and CLI import this module without paying for torch or IPv8.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from quinkgl_cli.errors import UsageError

MAX_NODE_ID = 64
_NODE_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NODE_ID - 1}}}$")
NODE_ID_RULE = f"1-{MAX_NODE_ID} letters, digits, '.', '_' or '-', starting with a letter or digit"
LOOPBACK = "127.0.0.1"
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


def is_node_id(value: object) -> bool:
    """Whether ``value`` is a valid node id (for ids that arrive from peers: unfit ones are not shown as names)."""
    return isinstance(value, str) and _NODE_ID.match(value) is not None


def node_id(value: str, flag: str = "--node-id") -> str:
    """``value`` if it is a valid node id, else a UsageError naming ``flag``."""
    if not is_node_id(value):
        raise UsageError(f"{flag} {value!r} is invalid", f"use {NODE_ID_RULE}")
    return value


def _localhost(host: str) -> str:
    return LOOPBACK if host.lower().rstrip(".") == "localhost" else host


def listen_address(value: str, flag: str = "--listen") -> str:
    """An IPv4 address to bind, normalized (``127.000.0.1`` is refused, as ipaddress refuses it)."""
    text = _localhost(value.strip())
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {value!r} is not an IP address", f"e.g. {flag} 127.0.0.1 or {flag} 0.0.0.0") from exc
    if address.version != 4:
        raise UsageError(f"{flag} {value!r} is not IPv4", f"IPv6 is not supported yet; e.g. {flag} 127.0.0.1 or {flag} 0.0.0.0")
    return str(address)


def listen_port(value: int, flag: str = "--port") -> int:
    """A port to bind: 0-65535 (0: the system picks a free one)."""
    if not 0 <= value <= 65535:
        raise UsageError(f"{flag} {value} is outside 0-65535", "0 lets the system pick a free port")
    return value


def peer_address(value: str, flag: str = "--bootstrap-peer") -> tuple[str, int]:
    """``host:port`` of a peer to contact, as ``(host, port)``; the host is an IPv4 address or a DNS name."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    host = _localhost(host)
    example = f"e.g. {flag} 127.0.0.1:7001"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {value!r} is not HOST:PORT (port 1-65535)", example)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host) or host.replace(".", "").isdigit():
            raise UsageError(f"{flag} {value!r}: {host!r} is neither an IPv4 address nor a host name", example) from None
        return host, int(port)
    if address.version != 4:
        raise UsageError(f"{flag} {value!r} is not IPv4", f"IPv6 is not supported yet; {example}")
    return str(address), int(port)


def peer_text(value: str, flag: str = "--bootstrap-peer") -> str:
    """``value`` checked by :func:`peer_address` and written back as ``host:port``."""
    host, port = peer_address(value, flag)
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP address (a name is never taken for one: it is not resolved here)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable_peers(
    listen: str, peers: Iterable[tuple[str, int]], *, lan_discovery: bool = False, public_bootstrap: bool = False
) -> None:
    """The loopback rule: a node bound to loopback may only be pointed at loopback peers and local discovery."""
    if not is_loopback(listen):
        return
    if lan_discovery or public_bootstrap:
        raise UsageError(
            "LAN discovery and public bootstrap servers need a non-loopback listen address",
            "add --listen 0.0.0.0 (or this host's LAN address)",
        )
    for host, port in peers:
        if not is_loopback(host):
            raise UsageError(
                f"bootstrap peer {host}:{port} is not on loopback, but this node listens on {listen}",
                "listen on a reachable address, e.g. --listen 0.0.0.0",
            )
