"""How reachable this node is, as its peers see it, and what to change: the ``reachability`` log line.

Owns the last reported view, so a line is logged at start and then only when the view changes (the NAT type
observed, whether our TCP port is reachable, how many relays we know). It reads what `services` (addresses
our peers see, relay volunteers) and `links` (the ways transfers took, whether peers reached our TCP port) know.
"""

from __future__ import annotations

import logging
from typing import Any

from quinkgl_cli.events import emit
from quinkgl_cli.transport.ipv8.links import Links
from quinkgl_cli.transport.ipv8.services import Services
from quinkgl_cli.validation import is_loopback

log = logging.getLogger("quinkgl.transport")


def advice(nat: str, tcp: str, relays: int, volunteer: bool, listen: str) -> str:
    if is_loopback(listen):
        return "loopback only: peers on this host only (--listen an address peers can reach to join others)"
    if nat == "symmetric" and not relays:
        return "symmetric NAT and no relay among your peers: ask a reachable peer to run with --relay"
    if nat in ("mapped", "symmetric"):
        return "behind NAT: models reach you through public peers, relays or punched UDP ways; forwarding the port helps"
    if tcp == "closed":
        return "TCP port unreachable (firewall?): peers use reverse or relayed transfers; open it for direct ones"
    if nat == "none" and tcp == "open" and not volunteer:
        return "reachable: --relay would help peers behind NATs"
    return "-"


class Reachability:
    def __init__(self, node_id: str, listen: str, udp: tuple[str, int], tcp_port: int, services: Services, links: Links,
                 volunteer: bool) -> None:
        self.node_id = node_id
        self.listen = listen
        self.udp = udp
        self.tcp_port = tcp_port
        self.services = services
        self.links = links
        self.volunteer = volunteer
        self._last: tuple[Any, ...] | None = None

    def view(self) -> dict[str, Any]:
        nat = self.services.nat()
        tcp = self.links.tcp_reachability()
        relays = len(self.services.relays)
        seen = sorted(f"{h}:{p}" for h, p in self.services.mappings())
        return {"nat": nat, "udp": f"{self.udp[0]}:{self.udp[1]}", "seen_as": seen[:4], "tcp": tcp,
                "tcp_port": self.tcp_port, "relays": relays, "relay": self.volunteer, "paths": self.links.book.snapshot(),
                "advice": advice(nat, tcp, relays, self.volunteer, self.listen)}

    def tick(self) -> None:
        """Log the view if it changed (the paths per peer are not part of the change: they come with it)."""
        v = self.view()
        key = (v["nat"], tuple(v["seen_as"]), v["tcp"], v["relays"])
        if key == self._last:
            return
        self._last = key
        emit(log, logging.INFO, "reachability", context={"node": self.node_id}, nat=v["nat"], udp=v["udp"],
             seen_as=v["seen_as"], tcp=v["tcp"], tcp_port=v["tcp_port"], relays=v["relays"], relay=v["relay"],
             advice=v["advice"])
