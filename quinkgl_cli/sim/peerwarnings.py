"""Warnings every simulated peer gives alike, said once per run by `quinkgl simulate` with the number of peers.

A swarm of 100 peers on data of the wrong input shape printed 100 identical `input-shape-mismatch` lines (one per
peer's node); the simulator's nodes are the daemon's, which says it once for its one peer. Held back while the swarm
runs, they come out once each, with ``peers=N``, when it ends (also when it fails: they may say why).

The sharded backends' workers are other processes: each holds its peers' warnings the same way (`worker_logging`)
and hands them over as data when the run ends (`PeerWarnings.export`); the driver replays them (`replay`) into its
own log, where the run's filter counts them with the rest, so a run says each once whatever its backend.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from quinkgl_cli.events import EVENT_ATTR, FIELDS_ATTR, emit

ONCE_PER_RUN = frozenset({"input-shape-mismatch", "optimizer-leaves-out"})

log = logging.getLogger("quinkgl.sim")


class PeerWarnings(logging.Filter):
    """A filter for the simulation's log handler: holds back the `ONCE_PER_RUN` events, counting peers per wording."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[dict[str, Any], set[str]]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, EVENT_ATTR, None)
        if event not in ONCE_PER_RUN:
            return True
        fields: dict[str, Any] = getattr(record, FIELDS_ATTR, {})
        key = (str(event), tuple(sorted((k, repr(v)) for k, v in fields.items())))
        _fields, peers = self.held.setdefault(key, (fields, set()))
        peers.add(str(getattr(record, "node", "-")))
        return False

    def say(self) -> None:
        """Each held warning once, with the number of peers that gave it; then nothing is held."""
        for (event, _key), (fields, peers) in self.held.items():
            emit(log, logging.WARNING, event, **fields, peers=len(peers))
        self.held.clear()

    def export(self) -> list[dict[str, Any]]:
        """What is held, as JSON-ready data (the fields are events' normalized values), and nothing held after."""
        out = [{"event": event, "fields": fields, "peers": sorted(peers)}
               for (event, _key), (fields, peers) in self.held.items()]
        self.held.clear()
        return out


def replay(exported: list[dict[str, Any]]) -> None:
    """Log again, once per peer as that peer, what a worker's `PeerWarnings.export` gave."""
    for warning in exported:
        for peer in warning["peers"]:
            emit(log, logging.WARNING, warning["event"], context={"node": peer}, **warning["fields"])


def stderr_handler() -> logging.StreamHandler:
    """How a simulation writes its nodes' lines to stderr, in the driver and in its workers alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(node)s %(message)s", defaults={"node": "-"}))
    return handler


def worker_logging(level: int) -> PeerWarnings:
    """A shard worker process's log: its nodes' lines to stderr as the driver writes them, the `ONCE_PER_RUN`
    ones held by the returned filter for the driver."""
    handler = stderr_handler()
    held = PeerWarnings()
    handler.addFilter(held)
    logger = logging.getLogger("quinkgl")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return held
