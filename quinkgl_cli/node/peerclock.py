"""The swarm's clock as this node sees it: which round each peer is in, whether to catch up, whom to wait for.

Owns, per peer: the newest round of a valid update (`note_valid`; the quorum catch-up reads only these), the
rounds of ours in which it delivered valid updates (its history), the arrival time and round of its newest update
and its seconds per round (`note_arrival`; pacing reads these) and the lag noted on arrival; and the round before
which no peer is waited for again (after a wait that timed out). Also owns the decision a real-time driver asks for
before a round (`pace_plan`): whom to wait for and for how long. Nothing here is checkpointed: peers' rounds and
histories are relearned from their next updates, and forgotten when the peer leaves (`forget`).

Identities cost nothing in an open swarm, so neither the catch-up quorum nor pacing counts identities. The quorum
counts only peers with a history: valid updates in `HISTORY_ROUNDS` different rounds of ours, so fresh keys
claiming round 1,000,000 cannot end this node's training, and a claim above the round limit is ignored outright
(an honest peer of the same swarm never runs past it). Pacing waits only for peers that have shown progress (two
updates of increasing rounds, which gives their round period; a slow peer's updates are often stale, so validity
cannot be asked of them): identities taking turns, each sending one update that claims an old round, cannot make
it wait. Identities whose rounds do advance, each falling behind in turn, cannot either: a wait that timed out (a
peer still behind at its end) is followed by `PACE_MUTE_ROUNDS` rounds with no wait for anyone, so however many keys
pose as slow partners, waits that buy nothing cost at most one per that many rounds. What a history cannot stop
is a majority of long-lived liars; only admission (certified membership) can.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

PACE_MUTE_ROUNDS = 10  # after a pacing wait that timed out, no peer is waited for this many rounds
PACE_WAIT_CAP_S = 10.0  # before a round, wait at most this long (or three rounds of ours) for lagging peers
PACE_HISTORY = 5  # own rounds whose median duration is "one typical round"
HISTORY_ROUNDS = 3  # rounds of ours with valid updates from a peer before it counts for catch-up and pacing


@dataclass(frozen=True)
class CatchUp:
    to_round: int
    peers: int
    quorum: int


@dataclass(frozen=True)
class PacePlan:
    """Wait up to ``patience`` seconds for ``lagging`` peers (peer -> rounds behind) before the next round."""

    lagging: dict[str, int]
    patience: float


class PeerClock:
    def __init__(self, max_staleness: int, clock: Callable[[], float]) -> None:
        self.max_staleness = max_staleness
        self.clock = clock
        self._lock = threading.Lock()
        self._peer_rounds: dict[str, int] = {}  # newest round of a valid update from each peer
        self._lagging: dict[str, int] = {}  # peers whose last update arrived close to (or past) the staleness limit
        self._last_arrival: dict[str, tuple[float, int]] = {}  # per peer: (clock, round) of its newest round seen
        self._round_period: dict[str, float] = {}  # per peer: seconds per round, from its updates' arrivals
        self._pace_quiet_until = 0  # no pacing on any peer before this round (a wait timed out)
        self._history: dict[str, set[int]] = {}  # per peer: rounds of ours with a valid update (up to HISTORY_ROUNDS)

    @property
    def pace_lag(self) -> int:
        """How many rounds behind a peer's update may arrive before this node waits for that peer: at the staleness
        limit its next update would already be dropped."""
        return max(self.max_staleness, 1)

    def note_valid(self, sender: str, round_: int, current_round: int) -> None:
        """A valid update of ``round_`` came from ``sender`` during our ``current_round``: the swarm's clock counts
        only such updates, and they make the sender's history."""
        with self._lock:
            self._peer_rounds[sender] = max(round_, self._peer_rounds.get(sender, round_))
            seen = self._history.setdefault(sender, set())
            if len(seen) < HISTORY_ROUNDS:
                seen.add(current_round)

    def forget(self, peer: str) -> None:
        """``peer`` left (lost, evicted, restarted): what this clock knew of it goes too, so keys that come and go
        leave nothing behind; should it come back, its rounds and history are learned again."""
        with self._lock:
            for table in (self._peer_rounds, self._lagging, self._last_arrival, self._round_period, self._history):
                table.pop(peer, None)

    def has_history(self, peer: str) -> bool:
        """Whether ``peer`` delivered valid updates in `HISTORY_ROUNDS` different rounds of ours."""
        with self._lock:
            return len(self._history.get(peer, ())) >= HISTORY_ROUNDS

    def note_arrival(self, sender: str, round_: int, current_round: int) -> None:
        """Remember a peer whose update came ``pace_lag`` or more rounds behind ours, forget it once one comes closer.

        Only pacing reads this (a peer claiming an old round can at most make us wait a bounded time), so the
        claimed round of any authenticated update counts, before validation."""
        lag = current_round - round_
        now = self.clock()
        with self._lock:
            last = self._last_arrival.get(sender)
            if last is None or round_ > last[1]:
                if last is not None:
                    period = (now - last[0]) / (round_ - last[1])
                    old = self._round_period.get(sender)
                    self._round_period[sender] = period if old is None else 0.5 * (old + period)
                self._last_arrival[sender] = (now, round_)
            if lag >= self.pace_lag:
                self._lagging[sender] = lag
            else:
                self._lagging.pop(sender, None)

    def catch_up(self, next_round: int, known: Iterable[str], round_limit: int | None) -> CatchUp | None:
        """The round to jump to instead of ``next_round`` when most known peers are far ahead, or None.

        A peer that restarted from an old checkpoint would otherwise stay behind for good (rounds advance at the
        same cadence everywhere) and have every update dropped as stale. It jumps to the highest round that a
        quorum of its known peers with a history (`has_history`) has reached, when that is more than
        ``max_staleness`` ahead, capped at the round limit. The quorum is a majority of those peers and never
        fewer than two, a peer's round counts only from updates that decoded and validated, and a claim above the
        round limit counts as no claim: neither one peer (a liar, or the only other peer of a two-peer swarm), nor
        a minority claiming huge rounds, nor any number of fresh identities can push it to the end of training.
        """
        with self._lock:  # peers not heard from yet, or claiming past the limit, count as being where we are
            if isinstance(known, (Mapping, AbstractSet)) and len(self._history) < len(known):
                # The same peers, found from the fewer side (each known peer once; their order does not matter).
                counted: Iterable[str] = (p for p in self._history if p in known)
            else:
                counted = known
            rounds = sorted(
                (self._claim(p, next_round, round_limit) for p in counted if len(self._history.get(p, ())) >= HISTORY_ROUNDS),
                reverse=True,
            )
        quorum = max(2, len(rounds) - (len(rounds) - 1) // 2)
        if len(rounds) < quorum or rounds[quorum - 1] <= next_round + self.max_staleness:
            return None
        reached = rounds[quorum - 1]
        target = reached if round_limit is None else min(reached, round_limit)
        return CatchUp(target, len(rounds), quorum) if target > next_round else None

    def _claim(self, peer: str, default: int, round_limit: int | None) -> int:
        claimed = self._peer_rounds.get(peer, default)
        return default if round_limit is not None and claimed > round_limit else claimed

    def lagging(self, known: Iterable[str], completed_round: int, current_round: int) -> dict[str, int]:
        """Known peers to wait for before the next round, with how many rounds they lag.

        Two signals: an update that arrived ``pace_lag`` or more rounds behind ours (noted on arrival), and, for a
        peer sending regularly (its round period known, heard from within three periods), the round it has reached
        by now more than ``pace_lag`` behind the round about to begin: between that peer's updates a faster node
        would otherwise race ahead again. The round it has reached is its newest round plus the periods since that
        arrived: on a sparse topology a peer in step with us sends to us only now and then, and its newest round to
        us is rounds old without it being late (taken as its round, it had every node wait for partners that were
        not behind at all). A peer that sends rarely is not active and is never waited for, nor is one that has not
        shown progress (no round period yet): identities taking turns, each claiming an old round once, would
        otherwise each buy one wait."""
        now = self.clock()
        upcoming = completed_round + 1
        out: dict[str, int] = {}
        with self._lock:
            if self._pace_quiet_until > current_round:
                return out
            for p in known:
                if p not in self._round_period:
                    continue
                lag = self._lagging.get(p)
                last, period = self._last_arrival.get(p), self._round_period.get(p)
                if last is not None and period is not None and now - last[0] <= 3 * period:
                    reached = last[1] + (int((now - last[0]) / period) if period > 0 else 0)
                    behind = upcoming - reached
                    if behind > self.pace_lag:
                        lag = max(lag or 0, behind)
                if lag is not None:
                    out[p] = lag
        return out

    def round_period(self, peer: str) -> float | None:
        """Seconds per round of ``peer`` as its updates' arrivals show (None until two of its rounds arrived)."""
        with self._lock:
            return self._round_period.get(peer)

    def pace_plan(self, lagging: dict[str, int], own_durations: Sequence[float], interval: float) -> PacePlan | None:
        """How long to wait for ``lagging`` peers, or None when there is none.

        A peer L rounds behind needs about L - pace_lag + 1 of its rounds (its pace from its updates' arrivals;
        until that is known, up to the cap) to get there. The wait is capped (`PACE_WAIT_CAP_S`, or three of our
        rounds when those are longer: the median of ``own_durations``, at least ``interval``), with half a round of
        slack on top of the estimate: arrivals also wait for the peer's transfer and the driver's polling."""
        if not lagging:
            return None
        durations = sorted(own_durations[-PACE_HISTORY:])
        own = max(durations[len(durations) // 2] if durations else 0.0, interval)
        cap = max(PACE_WAIT_CAP_S, 3 * own)
        waits = []
        for peer, lag in lagging.items():
            period = self.round_period(peer)
            waits.append((lag - self.pace_lag + 1.5) * period if period else cap)
        patience = min(cap, max(waits))
        return PacePlan(dict(lagging), patience)

    def forget_lagging(self, timed_out: Collection[str], current_round: int) -> None:
        """The driver has waited on the current notes: each observed lag costs at most one wait. When some peer did
        not catch up within it, no peer gets a wait for `PACE_MUTE_ROUNDS` rounds: a stalled or lying peer cannot
        hold this node back round after round, nor can fresh keys each falling behind in turn (muted one by one, ten
        of them made real daemons wait 3-11 s before every round: `bench_attacks.py --scenarios pace-stretch`)."""
        with self._lock:
            self._lagging.clear()
            if timed_out:
                self._pace_quiet_until = current_round + PACE_MUTE_ROUNDS
