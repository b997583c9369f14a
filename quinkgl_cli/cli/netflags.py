"""The network and trust flags `quinkgl run` and `quinkgl doctor` share: one declaration, one validation.

Owns the flags' declarations (typer option types, so both commands spell and document them the same) and
`network_options`, which checks them together (the loopback rule, ``--relay`` needing a reachable address) and
returns the flat option names `node.options.DaemonOptions.from_flags` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from quinkgl_cli import validation
from quinkgl_cli.errors import UsageError

Manifest = Annotated[Path, typer.Option("--manifest", "-m", help="Swarm manifest (.qgl) to join.", metavar="FILE")]
NodeId = Annotated[
    str | None, typer.Option("--node-id", metavar="NAME", help="This peer's name in logs and to other peers (default: host name).")
]
Port = Annotated[int, typer.Option("--port", metavar="PORT", help="UDP port for IPv8 (0: any free port).")]
Listen = Annotated[str, typer.Option("--listen", help="Address to bind (default loopback only).", metavar="ADDR")]
TrustPolicy = Annotated[
    str | None,
    typer.Option("--trust-policy", metavar="POLICY", help="open | tofu | pinned (default: pinned with --trusted-pubkey, else tofu)."),
]
TrustedPubkey = Annotated[
    list[str] | None, typer.Option("--trusted-pubkey", metavar="KEY", help="Creator key ed25519:<hex> or key file (repeatable).")
]
Certificate = Annotated[
    Path | None,
    typer.Option("--certificate", metavar="FILE", help="This node's admission certificate (`quinkgl admit`); required in certified swarms."),
]
Revocations = Annotated[
    Path | None,
    typer.Option("--revocations", metavar="FILE", help="The creator's revocation list (`quinkgl revoke`); read again when it changes, spread to peers."),
]
BootstrapPeer = Annotated[
    list[str] | None, typer.Option("--bootstrap-peer", metavar="HOST:PORT", help="HOST:PORT of a peer to contact first (repeatable).")
]
StateDir = Annotated[Path | None, typer.Option("--state-dir", help="TOFU store and node keys (default: $QUINKGL_HOME).", metavar="DIR")]
PublicBootstrap = Annotated[
    bool, typer.Option("--public-bootstrap/--no-public-bootstrap", help="Also ask IPv8's public bootstrap servers (off by default).")
]
LanDiscovery = Annotated[
    bool, typer.Option("--lan-discovery/--no-lan-discovery", help="Discover peers on the local network (off by default).")
]
Relay = Annotated[
    bool, typer.Option("--relay/--no-relay",
                       help="Relay model transfers between peers that cannot connect to each other (NAT); needs a reachable --listen address.")
]
RelayRate = Annotated[
    float, typer.Option("--relay-rate", metavar="MB_PER_S", help="With --relay: megabytes per second relayed, all transfers together.")
]
Rendezvous = Annotated[
    bool, typer.Option("--rendezvous/--no-rendezvous",
                       help="Find daemons of the same swarm on this host through the state directory (on by default; no network traffic).")
]


def network_options(*, listen: str, port: int, bootstrap_peer: list[str] | None, public_bootstrap: bool, lan_discovery: bool,
                    relay: bool, relay_rate: float, rendezvous: bool) -> dict[str, Any]:
    """The network flags checked together, as `DaemonOptions.from_flags` names them; UsageError says what is wrong."""
    listen = validation.listen_address(listen)
    validation.listen_port(port)
    peers = [validation.peer_address(b) for b in bootstrap_peer or []]
    validation.reachable_peers(listen, peers, lan_discovery=lan_discovery, public_bootstrap=public_bootstrap)
    if not relay_rate > 0:
        raise UsageError(f"--relay-rate {relay_rate} must be positive", "e.g. --relay-rate 20 (megabytes per second)")
    if relay and validation.is_loopback(listen):
        raise UsageError("--relay needs a reachable listen address: peers behind NATs must connect to the relay",
                         "add --listen 0.0.0.0 (or this host's address)")
    return {
        "port": port,
        "listen": listen,
        "bootstrap_peers": [f"{host}:{p}" for host, p in peers],
        "transport_options": {"enable_public_bootstrap": public_bootstrap, "enable_lan_discovery": lan_discovery, "relay": relay,
                              **({"relay_rate": int(relay_rate * 1_000_000)} if relay else {})},
        "rendezvous": rendezvous,
    }
