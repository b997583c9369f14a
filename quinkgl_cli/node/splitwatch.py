"""Whether this node's swarm has fallen apart, as the gossip graph it observes shows, and whether it came together.

Owns the split in progress: the peers cut off (lost without a goodbye, `Transport.cut_off`, and not known again)
and the round it began. After each round the driver calls `check`. The graph it judges is the one the node
observes (`GossipGraphMonitor.edges`: its exchanges and its neighbours' over the spectral window), with an edge to
every peer known now, without the edges that joined a peer cut off to this side, and with the peers cut off kept
as nodes. When that graph is disconnected (algebraic connectivity zero: a component cut off), the node says so
once (``swarm-split``, WARNING: the peers cut off, the components, the seeds) and asks its transport to reach out
to its seeds and the peers it lost (`Transport.rejoin`), again after every round while the split lasts. It says
``swarm-healed`` once every component cut off has a peer back (the graph is one again: a peer of that part that
left meanwhile is named ``not_back``), or ``swarm-split-given-up`` when the transport forgot the peers cut off
before that. A peer that said goodbye is not cut
off: a swarm whose peers finish their runs does not split.
"""

from __future__ import annotations

import logging

from quinkgl_cli.events import emit
from quinkgl_cli.node.core import Node
from quinkgl_cli.strategies.spectral import analyze_edges, components

log = logging.getLogger("quinkgl.daemon")


class SplitWatch:
    def __init__(self, node: Node, seeds: list[str]) -> None:
        self.node = node
        self.seeds = seeds
        self.parts: list[set[str]] = []  # the components cut off (empty: no split)
        self.since = 0  # the round the split was seen in

    def graph(self, cut: list[str], round_: int) -> tuple[list[tuple[str, str]], set[str]]:
        """The observed graph as it stands: edges and nodes (see the module docstring)."""
        me, known, gone = self.node.node_id, set(self.node.known_peers), set(cut)
        observed = self.node.graph.monitor.edges(round_)
        edges = [(u, v) for u, v in observed if (u in gone) == (v in gone)]  # an edge across the cut is broken
        edges += [(me, peer) for peer in known]
        return edges, {me, *known, *gone}

    def check(self, round_: int) -> None:
        node = self.node
        cut = [p for p in node.transport.cut_off() if p not in node.known_peers]
        if not self.parts:
            if cut:
                self._split(cut, round_)
            return
        self.parts += [{p} for p in cut if not any(p in part for part in self.parts)]
        known = node.known_peers.keys()
        every = set().union(*self.parts)
        back = sorted(every & known)
        if all(part & known for part in self.parts) or not cut:
            # Each part cut off has a peer back, so the graph is one again; or the transport forgot them all.
            healed = all(part & known for part in self.parts)
            emit(log, logging.INFO if healed else logging.WARNING, "swarm-healed" if healed else "swarm-split-given-up",
                 rejoined=back, not_back=sorted(every.difference(back)), rounds=round_ - self.since, known=len(known))
            self.parts = []
            return
        node.transport.rejoin()

    def _split(self, cut: list[str], round_: int) -> None:
        edges, nodes = self.graph(cut, round_)
        report = analyze_edges(edges, nodes)
        if report.is_connected:
            return
        parts = components(edges, nodes)
        me = self.node.node_id
        self.parts = [{str(n) for n in part} for part in parts if me not in part]
        self.since = round_
        knocking = self.node.transport.rejoin()
        emit(log, logging.WARNING, "swarm-split", cut_off=sorted(cut), components=len(parts),
             component=len(next(p for p in parts if me in p)), lambda2=round(report.algebraic_connectivity, 4),
             known=len(self.node.known_peers), seeds=len(self.seeds), knocking=knocking,
             hint="reconnecting through the seeds and the peers lost; check the network between the parts")
