"""What `quinkgl doctor` concludes from what it observed: reachability, the way to each peer, what to change.

Pure: no I/O, no clock. `assess` takes the observations (`Observed`: how peers see our datagrams, which peers
reached our TCP port when asked and whose we reached, the relays among them, the ways the transport would try)
and returns the `Diagnosis` the command prints, with its verdict: ``reachable`` (peers reach our UDP port, at the
address they see, without hole punching defeated by a symmetric NAT, and our TCP port), ``not_reachable``, or
``no_peers``. Each problem is one line saying what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

REACHABLE, NOT_REACHABLE, NO_PEERS = "reachable", "not_reachable", "no_peers"
NONE = "none"  # no way for models in that direction


@dataclass(frozen=True)
class PeerObserved:
    node_id: str
    address: str  # where its datagrams come from
    seen_as: str | None  # where it sees ours come from (None: it has not said yet)
    tcp_in: bool | None  # it reached our TCP port when asked (None: not probed)
    tcp_out: str  # whether we reached its: "open", or why not
    relay: bool  # it volunteers as a relay
    routes: list[str]  # the ways its models would be fetched, in the order the transport tries them


@dataclass(frozen=True)
class Observed:
    node_id: str
    swarm_id: str
    listen: str  # the address we are bound to
    udp: str  # host:port bound
    tcp_port: int
    loopback: bool  # bound to loopback: only peers on this host
    nat: str  # unknown | none | mapped | symmetric (`services.Services.nat`)
    seen_as: list[str]  # the addresses peers see our datagrams come from
    peers: list[PeerObserved]
    timeout: float
    elapsed: float


@dataclass
class PeerPaths:
    node_id: str
    address: str
    seen_as: str | None
    tcp_in: bool | None
    tcp_out: str
    relay: bool
    receive: str  # the way its models come to us: direct | reverse | relay:<id> | udp | none
    send: str  # the way ours go to it
    tries: list[str]  # the transport's order for receiving (`paths`)


@dataclass
class Diagnosis:
    verdict: str
    node_id: str
    swarm_id: str
    listen: str
    udp: str
    udp_state: str  # open | punch | relay_only | unknown
    tcp_port: int
    tcp_state: str  # open | closed | unknown
    nat: str
    seen_as: list[str]
    relays: list[str]
    peers: list[PeerPaths]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _udp_state(nat: str) -> str:
    return {"none": "open", "mapped": "punch", "symmetric": "relay_only"}.get(nat, "unknown")


def _tcp_state(peers: list[PeerObserved]) -> str:
    asked = [p.tcp_in for p in peers if p.tcp_in is not None]
    if any(asked):
        return "open"
    return "closed" if asked else "unknown"


def _receive(peer: PeerObserved, usable_relays: list[str]) -> str:
    """The first of the transport's ways for ``peer``'s models whose condition held in the probes."""
    for route in peer.routes:
        if route == "direct" and peer.tcp_out == "open":
            return route
        if route == "reverse" and peer.tcp_in:
            return route
        if route.startswith("relay:") and route.split(":", 1)[1] in usable_relays:
            return route
        if route == "udp":  # offered only for a peer whose datagrams reach us directly
            return route
    return NONE


def _send(peer: PeerObserved, usable_relays: list[str]) -> str:
    """How our models reach ``peer``: it connects to us, we connect out to it, both meet at a relay, or, last,
    over the UDP way we exchange datagrams on (when its datagrams reach us directly, ours reach it)."""
    if peer.tcp_in:
        return "direct"
    if peer.tcp_out == "open":
        return "reverse"
    others = [r for r in usable_relays if r != peer.node_id]
    if others:
        return f"relay:{others[0]}"
    return "udp" if "udp" in peer.routes else NONE


def assess(o: Observed) -> Diagnosis:
    relays = [p.node_id for p in o.peers if p.relay]
    usable = [p.node_id for p in o.peers if p.relay and p.tcp_out == "open"]  # relays whose TCP port we reach
    paths = [PeerPaths(p.node_id, p.address, p.seen_as, p.tcp_in, p.tcp_out, p.relay, _receive(p, usable), _send(p, usable),
                       list(p.routes)) for p in o.peers]
    tcp = _tcp_state(o.peers)
    d = Diagnosis(NO_PEERS, o.node_id, o.swarm_id, o.listen, o.udp, _udp_state(o.nat), o.tcp_port, tcp, o.nat,
                  list(o.seen_as), relays, paths, elapsed=round(o.elapsed, 2))
    if o.loopback:
        d.notes.append(f"listening on loopback ({o.listen}): only peers on this host can reach this node; "
                       "--listen 0.0.0.0 (or this host's address) to join peers on other hosts")
    if not o.peers:
        d.problems.append(f"no peer met within {o.timeout:g}s: check that --bootstrap-peer (or the manifest's bootstrap_peers) "
                          "names a running peer of this swarm at an address this host can reach, or raise --timeout")
        return d
    _problems(o, d, tcp, usable)
    udp_ok = o.nat in ("none", "mapped", "unknown")
    d.verdict = REACHABLE if udp_ok and tcp == "open" else NOT_REACHABLE
    return d


def _problems(o: Observed, d: Diagnosis, tcp: str, usable: list[str]) -> None:
    port = o.tcp_port
    if o.nat == "symmetric":
        d.problems.append(f"symmetric NAT (peers see this node at {len(o.seen_as)} different addresses): hole punching cannot "
                          "work, so peers behind NATs exchange models with it only through a relay"
                          + ("" if usable else "; no relay among the peers met: run a reachable peer with --relay"))
    elif o.nat == "mapped":
        d.notes.append(f"behind a NAT (peers see {', '.join(o.seen_as)}): peers behind other NATs reach this node after "
                       "introductions punch a way")
        if sum(1 for p in o.peers if p.seen_as) < 2:
            d.notes.append("only one peer reported where it sees this node: a symmetric NAT cannot be told apart; "
                           "meet two peers (two --bootstrap-peer) to know")
    elif o.nat == "unknown":
        d.notes.append("no peer reported where it sees this node within the time: NAT type unknown (peers of an older version?)")
    if tcp == "closed":
        if o.nat in ("mapped", "symmetric"):
            d.problems.append(f"TCP port {port} is not reachable from peers (behind NAT): forward TCP {port} and UDP "
                              f"{o.udp.rsplit(':', 1)[1]} on the router to this host for direct transfers; until then "
                              "models come by reverse, relayed or UDP transfers")
        else:
            d.problems.append(f"TCP port {port} is not reachable from peers though its UDP port is (a firewall?): allow "
                              f"inbound TCP {port} for direct transfers; until then models come by reverse, relayed or UDP "
                              "transfers")
    for p in d.peers:
        if p.receive == NONE or p.send == NONE:
            which = " and ".join(w for w, way in (("from", p.receive), ("to", p.send)) if way == NONE)
            d.problems.append(f"no way for models {which} {p.node_id} (neither end reaches the other's TCP port, no "
                              "relay reachable by both, no direct UDP way): run a reachable peer with --relay")
