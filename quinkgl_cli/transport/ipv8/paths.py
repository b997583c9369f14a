"""Which way an offer's bytes come to us from each sender: the order to try them in, and what worked before.

Pure bookkeeping, no I/O (`links` opens the connections, `udpway` runs UDP transfers). Four ways, tried in this
order unless memory says otherwise: ``direct`` (we connect to the sender's TCP port), ``reverse`` (the sender
connects out to ours: it sits behind a NAT, we do not), ``relay`` (both ends connect out to a peer that volunteered
to relay) and, last, ``udp`` (the bytes come over the UDP way we already exchange datagrams on). The way that
last worked for a sender is tried first next time; a way that failed is skipped for ``retry_after`` seconds
unless nothing else is left, so a sender whose NAT or firewall changed is found again; ``udp`` for
``UDP_RETRY_AFTER`` seconds only. A way still connecting when another delivered counts as failed
(`links.Links.connect_any`); a way the sender said it was busy on does not (`busy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DIRECT, REVERSE, RELAY, UDP = "direct", "reverse", "relay", "udp"
PathName = Literal["direct", "reverse", "relay", "udp"]
_NAMES: dict[str, PathName] = {DIRECT: "direct", REVERSE: "reverse", RELAY: "relay", UDP: "udp"}
MAX_RELAYS_TRIED = 2  # relays tried for one transfer: each failure costs a wait
# Seconds a failed UDP way waits. It joins a transfer only once the TCP ways had their start (`fetcher`), so trying
# it again costs them nothing. (A sender busy with its UDP sends says so, `busy`, and its way is not failed; one of
# an older version drops the request without a word: over within a transfer's time, not minutes.)
UDP_RETRY_AFTER = 5.0


def path_name(path: str) -> PathName:
    """One of the four ways, typed as transfer reports carry it (every `Route` has one of them)."""
    return _NAMES[path]


@dataclass(frozen=True)
class Route:
    path: str
    relay: str | None = None  # the relay's node id, for RELAY

    def __str__(self) -> str:
        return f"{self.path}:{self.relay}" if self.relay else self.path


@dataclass
class _Memory:
    good: Route | None = None
    failed: dict[Route, float] = field(default_factory=dict)  # when each route last failed


class PathBook:
    def __init__(self, retry_after: float, udp_retry_after: float = UDP_RETRY_AFTER) -> None:
        self.retry_after = retry_after
        self.udp_retry_after = udp_retry_after
        self._peers: dict[str, _Memory] = {}

    def routes(self, peer: str, now: float, relays: list[str], reverse: bool, direct: bool = True,
               udp: bool = False) -> list[Route]:
        """The routes to try for ``peer``, best first. ``relays``: relay peers to consider (best first);
        ``reverse``: whether the sender could connect to us (False when we know we sit behind a NAT); ``direct``:
        whether to try its TCP port (False for a peer whose datagrams reach us only through a relay: its bytes
        will too, and a relay that failed once is tried again rather than a way that cannot work); ``udp``:
        whether its datagrams come to us directly (a UDP transfer is then possible, the last way tried)."""
        memory = self._peers.get(peer, _Memory())
        candidates = [Route(DIRECT)] if direct else []
        if reverse:
            candidates.append(Route(REVERSE))
        candidates += [Route(RELAY, r) for r in relays if r != peer]
        if udp:
            candidates.append(Route(UDP))
        fresh = [r for r in candidates if now - memory.failed.get(r, float("-inf")) >= self._wait(r)]
        stale = sorted((r for r in candidates if r not in fresh), key=lambda r: memory.failed[r])
        ordered = fresh or stale  # when every way failed lately, the one that failed longest ago goes first
        if memory.good in ordered:
            ordered.remove(memory.good)
            ordered.insert(0, memory.good)
        kept: list[Route] = []
        relayed = 0
        for route in ordered:
            if route.path == RELAY:
                relayed += 1
                if relayed > MAX_RELAYS_TRIED:
                    continue
            kept.append(route)
        return kept

    def _wait(self, route: Route) -> float:
        return self.udp_retry_after if route.path == UDP else self.retry_after

    def succeeded(self, peer: str, route: Route) -> bool:
        """Remember ``route`` for ``peer``; True when it is not the way used last time."""
        memory = self._peers.setdefault(peer, _Memory())
        memory.failed.pop(route, None)
        changed = memory.good != route
        memory.good = route
        return changed

    def failed(self, peer: str, route: Route, now: float) -> None:
        memory = self._peers.setdefault(peer, _Memory())
        memory.failed[route] = now
        if memory.good == route:
            memory.good = None

    def current(self, peer: str) -> Route | None:
        memory = self._peers.get(peer)
        return memory.good if memory is not None else None

    def forget(self, peer: str) -> None:
        """A lost peer that comes back may sit somewhere else: it starts afresh."""
        self._peers.pop(peer, None)

    def snapshot(self) -> dict[str, str]:
        """The way each sender's models came last (for `doctor` and the status)."""
        return {peer: str(m.good) for peer, m in self._peers.items() if m.good is not None}
