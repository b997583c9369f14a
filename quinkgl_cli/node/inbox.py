"""The inbox: the newest update received from each peer, waiting for the next aggregation.

Owns the held updates, the lock that guards them (transport callbacks may arrive from the event loop, or a
transport's own thread, while the trainer runs in a worker thread), the listener a waiting driver is woken through,
and the account of dropped updates: how many this round, and which (peer, reason) pairs were already logged at
WARNING (repeats go to DEBUG). Updates older than ``max_staleness`` rounds are dropped on arrival and again when
taken for aggregation (`too_old`). Nothing here is checkpointed: an inbox is rebuilt by the next exchange.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from quinkgl_cli.node.nodelog import FirstPerPeer, NodeLog
from quinkgl_cli.transport.base import ModelReceived


class Inbox:
    def __init__(self, max_staleness: int, log: NodeLog) -> None:
        self.max_staleness = max_staleness
        self._log = log
        self._updates: dict[str, ModelReceived] = {}
        self._lock = threading.Lock()
        self._drop_logged = FirstPerPeer()
        self.dropped = 0  # updates dropped since the round began
        # Set by a driver waiting for updates: called whenever one lands (possibly from another thread).
        self.listener: Callable[[], object] | None = None

    def too_old(self, update_round: int, current_round: int) -> bool:
        return update_round < current_round - self.max_staleness

    def put(self, update: ModelReceived, refused: str | None = None) -> None:
        """Hold ``update`` unless one from the same sender that is newer (round, then gossip step) is held, or the
        caller ``refused`` it (the reason: a copy, an echo, a replay)."""
        if refused is not None:
            self.drop(update.sender, update.round, refused)
            return
        with self._lock:
            old = self._updates.get(update.sender)
            if old is not None and _order(old) > _order(update):
                return
            self._updates[update.sender] = update
        if self.listener is not None:
            self.listener()

    def take_all(self) -> list[ModelReceived]:
        """Every held update, the inbox left empty; sorted by sender in reverse, so that a caller popping from the end
        visits senders in order and releases each payload once it is done with it."""
        with self._lock:
            taken = list(self._updates.values())
            self._updates.clear()
        taken.sort(key=lambda m: m.sender, reverse=True)
        return taken

    def snapshot(self) -> dict[str, ModelReceived]:
        """The held updates by sender (a copy)."""
        with self._lock:
            return dict(self._updates)

    def senders(self) -> set[str]:
        with self._lock:
            return set(self._updates)

    def fresh_from_all(self, peers: Iterable[str], round_: int) -> bool:
        """True when each of ``peers`` (at least one) has an update of ``round_`` or newer held."""
        peers = list(peers)
        if not peers:
            return False
        with self._lock:
            return all(p in self._updates and self._updates[p].round >= round_ for p in peers)

    def begin_round(self) -> None:
        self.dropped = 0

    def drop(self, sender: str, round_: int, reason: str) -> None:
        """Count and log a dropped update: the first of each kind per peer at WARNING, repeats at DEBUG."""
        self.dropped += 1
        kind = reason.split(" ", 1)[0].rstrip(":")
        self._log(self._drop_logged.level(sender, kind), "update-dropped", peer=sender, update_round=round_,
                  reason=reason)

    def forget(self, sender: str) -> None:
        """``sender`` left: which of its drops were logged is forgotten (a fresh key each time would grow it)."""
        self._drop_logged.forget(sender)

    def drop_stale(self, sender: str, round_: int) -> None:
        self.drop(sender, round_, f"stale (older than {self.max_staleness} rounds)")


def _order(update: ModelReceived) -> tuple[int, int, float]:
    step = update.meta.get("step", 0) if isinstance(update.meta, dict) else 0
    return (update.round, int(step) if isinstance(step, (int, float)) else 0, update.received_at)
