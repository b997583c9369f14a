"""A node's log events and user hooks: every part of a node logs through one `NodeLog`, which stamps each event
with the node's id and the round in progress, and calls the peer script's optional hooks so that a failing hook is
logged and never takes the node down.

Owns nothing but the logger name (``quinkgl.node``) and how to reach the node's id and current round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from quinkgl_cli.events import emit

log = logging.getLogger("quinkgl.node")


class Hooks(Protocol):
    """The optional user hooks the node calls (a `PeerScript` satisfies this; attributes may be None)."""

    on_round_end: Callable[[int, dict[str, Any]], Any] | None
    on_peer_discovered: Callable[[str], Any] | None
    on_aggregation_done: Callable[[list[str], int], Any] | None


@dataclass
class NoHooks:
    on_round_end: Callable[[int, dict[str, Any]], Any] | None = None
    on_peer_discovered: Callable[[str], Any] | None = None
    on_aggregation_done: Callable[[list[str], int], Any] | None = None


class NodeLog:
    """Log events of one node and call its hooks; ``round_of`` reads the round in progress when an event is logged."""

    def __init__(self, node_id: str, round_of: Callable[[], int], hooks: Hooks | None = None) -> None:
        self.node_id = node_id
        self.round_of = round_of
        self.hooks: Hooks = hooks if hooks is not None else NoHooks()

    def __call__(self, level: int, event: str, /, *, exc_info: Any = None, **fields: Any) -> None:
        if log.isEnabledFor(level):  # most events are DEBUG: skip building their context
            emit(log, level, event, exc_info=exc_info, context={"node": self.node_id, "round": self.round_of()},
                 **fields)

    def hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.hooks, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a user hook must never take the node down
            self(logging.ERROR, "hook-failed", hook=name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)


class FirstPerPeer:
    """The level of a repeatable report about a peer: WARNING the first time for each (peer, kind), DEBUG after
    (a member can repeat what it sends at will); forgotten when the peer leaves, so keys that come and go leave
    nothing behind."""

    def __init__(self) -> None:
        self._reported: set[tuple[str, str]] = set()

    def level(self, peer: str, kind: str) -> int:
        first = (peer, kind) not in self._reported
        self._reported.add((peer, kind))
        return logging.WARNING if first else logging.DEBUG

    def forget(self, peer: str) -> None:
        self._reported = {k for k in self._reported if k[0] != peer}

    def __len__(self) -> int:
        """How many (peer, kind) pairs are remembered."""
        return len(self._reported)


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its own ``one_line()`` when it has one (QuinkglError), else type and first line."""
    if hasattr(exc, "one_line"):
        return exc.one_line()  # type: ignore[no-any-return]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
