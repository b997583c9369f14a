"""Whether this node's swarm has fallen apart, as the gossip graph it observes shows, and whether it came together.

Owns the split in progress: the peers cut off (lost without a goodbye, `Transport.cut_off`, and not known again)
and the round it began, and the peers still missing after the last split healed. After each round the driver calls `check`. The graph it judges is the one the node
observes (`GossipGraphMonitor.edges`: its exchanges and its neighbours' over the spectral window), with an edge to
every peer known now, without the edges that joined a peer cut off to this side, and with the peers cut off kept
as nodes. When that graph is disconnected (algebraic connectivity zero: a component cut off), the node says so
once (``swarm-split``, WARNING: the peers cut off, the components, the seeds) and asks its transport to reach out
to its seeds and the peers it lost (`Transport.rejoin`), again after every round while any is missing. It says
``swarm-healed`` once a peer from across the cut is back (those still missing, a seed that left meanwhile say,
are named ``not_back`` and knocked at on without a new split line), or ``swarm-split-given-up`` when the
transport forgot the peers cut off before any came back. Which of the parts a returning peer belonged to is not
told apart: the exchanges a node sees between peers across the cut are too sparse to draw the parts from. A peer that said goodbye is not cut
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
        self.members: set[str] = set()  # every peer cut off since the split began (empty: no split)
        self.missing: set[str] = set()  # cut off and not back when the last split healed: knocked at, not news
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
        self.missing.intersection_update(cut)
        if not self.members:
            if any(p not in self.missing for p in cut):
                self._split(cut, round_)
            elif cut:
                node.transport.rejoin()
            return
        self.members.update(cut)  # the split may grow: peers fall silent one after another
        back = sorted(self.members.intersection(node.known_peers))
        if back or not cut:
            # A peer from across the cut is back: this node is joined to the rest again (those still missing are
            # knocked at on); or the transport forgot them all.
            emit(log, logging.INFO if back else logging.WARNING, "swarm-healed" if back else "swarm-split-given-up",
                 rejoined=back, not_back=sorted(self.members.difference(back)), rounds=round_ - self.since,
                 known=len(node.known_peers))
            self.members, self.missing = set(), set(cut)
            return
        node.transport.rejoin()

    def _split(self, cut: list[str], round_: int) -> None:
        edges, nodes = self.graph(cut, round_)
        report = analyze_edges(edges, nodes)
        if report.is_connected:
            return
        me = self.node.node_id
        self.since, self.members = round_, set(cut)
        parts = components(edges, nodes)
        knocking = self.node.transport.rejoin()
        emit(log, logging.WARNING, "swarm-split", cut_off=sorted(cut), components=len(parts),
             component=len(next(p for p in parts if me in p)), lambda2=round(report.algebraic_connectivity, 4),
             known=len(self.node.known_peers), seeds=len(self.seeds), knocking=knocking,
             hint="reconnecting through the seeds and the peers lost; check the network between the parts")
