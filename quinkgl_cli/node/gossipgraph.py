"""The gossip graph this node has observed, and its spectral numbers every ``spectral_every`` rounds.

Owns the `GossipGraphMonitor` (edges of the last ``spectral_window`` rounds: this node's sends, the senders it
aggregated and the recipients their updates name in ``gossip_to``) and the latest analysis, which the round
metrics carry as ``spectral_*`` and the ``spectral`` log line shows. Not checkpointed: the window refills in a few
rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any

from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.node.nodelog import NodeLog
from quinkgl_cli.strategies.base import PeerUpdate
from quinkgl_cli.strategies.spectral import GossipGraphMonitor

# Update meta naming the recipients of the send it rode on: how a peer learns its neighbours' gossip edges. Bounded
# so it always fits the transport's meta limit (4 KiB) next to the other keys.
GOSSIP_TO_KEY = "gossip_to"
MAX_GOSSIP_TO = 32
MAX_GOSSIP_TO_CHARS = 2048


class GraphWatch:
    def __init__(self, node_id: str, every: int, window: int, log: NodeLog) -> None:
        if every < 1 or window < 1:
            raise NodeConfigError(f"spectral_every and spectral_window must be >= 1, got {every} and {window}")
        self.node_id = node_id
        self.monitor = GossipGraphMonitor(window=window, every=every)
        self.latest: dict[str, Any] = {}
        self._log = log

    def record_sends(self, targets: Sequence[str], round_: int) -> None:
        for peer_id in targets:
            self.monitor.record(self.node_id, peer_id, round_)

    def observe(self, update: PeerUpdate, known: Container[str], round_: int) -> None:
        """The gossip edges an aggregated update shows: its sender to us, and to the recipients it names (only
        peers we know: a peer cannot fill the graph with invented nodes)."""
        self.monitor.record(update.peer_id, self.node_id, round_)
        named = update.meta.get(GOSSIP_TO_KEY)
        if isinstance(named, str):
            for peer_id in named.split(",")[:MAX_GOSSIP_TO]:
                if peer_id in known or peer_id == self.node_id:
                    self.monitor.record(update.peer_id, peer_id, round_)

    def analyze(self, round_: int) -> dict[str, Any]:
        """At the end of a round: every ``spectral_every`` rounds the spectral numbers of the observed graph, logged;
        returns the latest analysis (empty before the first)."""
        self.monitor.add_node(self.node_id, round_)
        if self.monitor.due(round_):
            fields = self.monitor.report(round_).fields()
            self.latest = {"round": round_, **fields}
            self._log(logging.INFO, "spectral", window=self.monitor.window, **fields)
        return dict(self.latest)


def gossip_to(targets: Sequence[str]) -> str:
    """The ``GOSSIP_TO_KEY`` value: recipients, comma-separated, as many as fit the bounds."""
    text = ""
    for peer_id in sorted(targets)[:MAX_GOSSIP_TO]:
        longer = f"{text},{peer_id}" if text else peer_id
        if len(longer) > MAX_GOSSIP_TO_CHARS:
            break
        text = longer
    return text
