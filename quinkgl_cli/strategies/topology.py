"""Peer selection strategies: which known peers receive this node's model each round.

All of them are deterministic for a given ``rng`` and a given set of known peers (the order in which the node
lists peers does not matter: they are sorted first), and never select the node itself.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quinkgl_cli.events import emit
from quinkgl_cli.manifest import strategy_params as p
from quinkgl_cli.strategies.base import AggregationResult, PeerUpdate, Topology
from quinkgl_cli.strategies.fingerprint import Fingerprint, component_similarities, parse_fingerprint, similarity

log = logging.getLogger("quinkgl.strategies")


def _candidates(peers: Sequence[str], self_id: str) -> list[str]:
    return sorted(set(peers) - {self_id})


class RandomTopology(Topology):
    """Uniform choice of ``fanout`` known peers per round (Ormandi et al.'s gossip learning)."""

    name = "RandomTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        pool = _candidates(peers, self.self_id)
        return self.rng.sample(pool, min(self.params.fanout, len(pool)))


class FullTopology(Topology):
    """Every known peer, every round (experiments; ignores fanout)."""

    name = "FullTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        return _candidates(peers, self.self_id)


class RingTopology(Topology):
    """Nodes sorted by id form a ring; send to the nearest ``fanout`` ring neighbours.

    Neighbours alternate successor, predecessor, second successor, ... so fanout 2 gives the undirected ring whose
    spectrum `strategies.spectral` reports (lambda_2 = 2 - 2 cos(2 pi / n)).
    """

    name = "RingTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        ring = sorted(set(peers) | {self.self_id})
        n = len(ring)
        if n <= 1:
            return []
        me = ring.index(self.self_id)
        chosen: list[str] = []
        step = 1
        while len(chosen) < min(self.params.fanout, n - 1):
            for offset in (step, -step):
                peer = ring[(me + offset) % n]
                if peer != self.self_id and peer not in chosen and len(chosen) < self.params.fanout:
                    chosen.append(peer)
            step += 1
        return chosen


class ExpanderTopology(Topology):
    """A fixed sparse random graph: the union of ceil(fanout / 2) rings, each ordering the node ids by a hash.

    Each ring gives a node its two neighbours in that ring's order, so the degree is at most 2 * ceil(fanout / 2).
    Every node that knows the same peers computes the same graph: edges are symmetric and stay put from round to
    round (CHOCO gossip needs that: the peers holding a node's public estimate hear every increment), and a peer
    that joins or leaves changes only its ring neighbours' edges. Unions of random cycles are expanders with high
    probability (Friedman, 2008), so the graph mixes far faster than RingTopology's id-ordered ring.
    """

    name = "ExpanderTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        nodes = sorted(set(peers) | {self.self_id})
        if len(nodes) <= 1:
            return []
        chosen: list[str] = []
        for ring_idx in range((self.params.fanout + 1) // 2):
            ring = sorted(nodes, key=lambda pid: hashlib.sha256(f"{ring_idx}:{pid}".encode()).digest())
            me = ring.index(self.self_id)
            for peer in (ring[(me + 1) % len(ring)], ring[me - 1]):
                if peer != self.self_id and peer not in chosen:
                    chosen.append(peer)
        return chosen


class RotationTopology(Topology):
    """Every peer takes its turn: the nodes on a ring ordered by a hash of their ids, each round a node sends to the
    nodes ``fanout`` offsets further along, the offsets stepping through 1 .. n-1 in a fixed shuffled order that
    every node computes alike.

    Why: the served model (`node.serving`) averages the latest model of each peer heard from recently, and on
    label-skewed splits what it misses is peers, so classes: uniform random picks (`RandomTopology`) leave a peer
    unheard for many rounds by chance (coupon collecting: at round 10 of a 20-peer swarm, fanout 3, peers still
    miss several others) and give some peers six models in a round and others none. Here every node that knows
    the same peers receives exactly ``fanout`` models a round and hears from every peer within
    ceil((n - 1) / fanout) rounds; the offset order is shuffled so that successive rounds reach far around the
    ring, not only the neighbours. Measured in benchmarks/LEARNING.md. Peers whose views or rounds differ still
    send to ``fanout`` distinct known peers a round; only the exact balance needs a shared view.
    """

    name = "RotationTopology"
    params: p.TopologyParams

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        ring = sorted(set(peers) | {self.self_id}, key=lambda pid: hashlib.sha256(pid.encode()).digest())
        n = len(ring)
        if n <= 1:
            return []
        fanout = min(self.params.fanout, n - 1)
        order = list(range(1, n))
        random.Random(n).shuffle(order)  # seeded by the swarm's size only: the same order on every node
        start = (max(round_idx, 1) - 1) * fanout
        me = ring.index(self.self_id)
        return [ring[(me + order[(start + k) % (n - 1)]) % n] for k in range(fanout)]


# A peer id as it may travel inside a shuffle: printable, no separators of the entry list.
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@+/=-]{1,200}$")


def _encode_entries(entries: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"{pid}|{age}" for pid, age in entries)


def _decode_entries(text: object, limit: int) -> list[tuple[str, int]]:
    """Parse a shuffle's ``id|age,...`` list; raises ValueError on anything malformed."""
    if not isinstance(text, str):
        raise ValueError("cyclon entries must be a string")
    if not text:
        return []
    items = text.split(",")
    if len(items) > limit:
        raise ValueError(f"cyclon shuffle carries {len(items)} entries (max {limit})")
    out: list[tuple[str, int]] = []
    for item in items:
        pid, sep, age = item.rpartition("|")
        if not sep or not _ID_RE.match(pid) or not age.isdigit() or len(age) > 9:
            raise ValueError(f"cyclon entry {item[:48]!r} is not id|age")
        out.append((pid, int(age)))
    return out


class CyclonTopology(Topology):
    """Cyclon membership (Voulgaris et al., 2005): a partial view of at most ``view_size`` peers with ages.

    Every round the node ages its view, removes the oldest entry Q and sends Q a shuffle of ``shuffle_length - 1``
    random view entries plus itself (age 0). Q answers with up to ``shuffle_length`` random entries of its own view
    and merges what it got; both sides fill empty slots first, then replace the entries they sent, and never keep
    themselves or duplicates.

    The view holds ids learned through shuffles whether or not the transport can reach them yet: they age and
    travel in shuffles like any entry, which is how membership spreads beyond what each transport discovered, and
    they become recipients as soon as the transport knows them. Only reachable peers are ever contacted: model
    recipients are chosen uniformly from the reachable view entries, and when the oldest entry is unreachable it
    leaves the view as a failed contact does in Cyclon, while the round's shuffle goes to the oldest reachable one.
    Peers the transport knows fill free view slots, and replace the oldest unreachable entries when fewer than
    ``fanout`` view entries are reachable, so partial knowledge never starves the node of recipients.
    """

    name = "CyclonTopology"
    params: p.CyclonParams
    SHUFFLE = "cyclon-shuffle"
    REPLY = "cyclon-reply"

    def __init__(self, params: p.Params, self_id: str, rng: random.Random) -> None:
        super().__init__(params, self_id, rng)
        self.view: dict[str, int] = {}
        self._known: set[str] = set()
        self._pending: dict[str, list[str]] = {}

    def reachable(self) -> list[str]:
        """View entries the transport can reach, sorted."""
        return sorted(pid for pid in self.view if pid in self._known)

    def _admit_known(self, peers: Sequence[str]) -> None:
        self._known = set(peers) - {self.self_id}
        fresh = sorted(self._known - set(self.view))
        free = self.params.view_size - len(self.view)
        for pid in self.rng.sample(fresh, min(max(free, 0), len(fresh))):
            self.view[pid] = 0
        missing = min(self.params.fanout, len(self._known)) - len(self.reachable())
        if missing <= 0:
            return
        fresh = sorted(self._known - set(self.view))
        unreachable = sorted((pid for pid in self.view if pid not in self._known), key=lambda pid: (-self.view[pid], pid))
        for old, pid in zip(unreachable, self.rng.sample(fresh, min(missing, len(fresh))), strict=False):
            del self.view[old]
            self.view[pid] = 0

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        self._admit_known(peers)
        pool = self.reachable()
        return self.rng.sample(pool, min(self.params.fanout, len(pool)))

    def control_messages(self, round_idx: int) -> list[tuple[str, str, dict[str, Any]]]:
        if not self.view:
            return []
        for pid in self.view:
            self.view[pid] += 1
        oldest = min(self.view, key=lambda pid: (-self.view[pid], pid))
        if oldest not in self._known:
            del self.view[oldest]
        pool = self.reachable()
        if not pool:
            return []
        target = min(pool, key=lambda pid: (-self.view[pid], pid))
        del self.view[target]
        others = sorted(self.view)
        subset = self.rng.sample(others, min(self.params.shuffle_length - 1, len(others)))
        entries = [(pid, self.view[pid]) for pid in subset] + [(self.self_id, 0)]
        self._pending[target] = subset
        return [(target, self.SHUFFLE, {"round": round_idx, "entries": _encode_entries(entries)})]

    def on_control(self, sender: str, kind: str, body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        if kind not in (self.SHUFFLE, self.REPLY):
            return []
        limit = max(self.params.shuffle_length, 1) + 1
        received = _decode_entries(body.get("entries", ""), limit)
        if kind == self.SHUFFLE:
            others = sorted(pid for pid in self.view if pid != sender)
            reply_ids = self.rng.sample(others, min(self.params.shuffle_length, len(others)))
            reply = {"round": body.get("round"), "entries": _encode_entries([(pid, self.view[pid]) for pid in reply_ids])}
            self._merge(received, reply_ids)
            return [(sender, self.REPLY, reply)]
        sent = self._pending.pop(sender, None)
        if sent is None:
            emit(log, logging.DEBUG, "cyclon-reply-unexpected", peer=sender)
            return []
        self._merge(received, sent)
        return []

    def _merge(self, received: Sequence[tuple[str, int]], replaceable: Sequence[str]) -> None:
        spare = [pid for pid in replaceable if pid in self.view]
        for pid, age in received:
            if pid == self.self_id or pid in self.view:
                continue
            if len(self.view) < self.params.view_size:
                self.view[pid] = age
            elif spare:
                del self.view[spare.pop(0)]
                self.view[pid] = age

    def state_dict(self) -> dict[str, Any]:
        return {"cyclon_view": _encode_entries(sorted(self.view.items()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        text = state.get("cyclon_view")
        if text is None:
            return
        entries = _decode_entries(text, self.params.view_size)
        self.view = {pid: age for pid, age in entries if pid != self.self_id}


def contribution_qualities(local: PeerUpdate, others: Sequence[PeerUpdate], result: AggregationResult) -> dict[str, float]:
    """Graded quality in [0, 1] of each sender's update: how close it came to what the aggregation produced.

    q = 1 / (1 + (d / s)^2), d = ||update - aggregate||, s = the median of d over the local model and every
    gradable update. Dividing by the round's own typical distance makes the grade free of model scale and of how
    far training moved this round: a typical contributor scores 0.5 (the neutral score of a peer nothing is known
    about), one closer than typical up to 1 (Krum's chosen update: exactly 1), an outlier toward 0 (0.2 at twice the
    typical distance, 0.01 at ten times). Closeness rather than "was used" matters because an averaging rule uses
    every valid update, so a used/unused bit would give every sender 1. Updates the aggregator rejected, and
    vectors that cannot be compared (wrong size, non-finite), score 0; a sender listed twice is graded once, by
    its first update, as the aggregators screen it.
    """
    target = result.flat.to(torch.float32)
    used, rejected = set(result.used), set(result.rejected)

    def distance(update: PeerUpdate) -> float | None:
        flat = update.flat
        if flat.dim() != 1 or flat.numel() != target.numel() or not flat.is_floating_point():
            return None
        d = float(torch.linalg.vector_norm(flat.to(torch.float32) - target))
        return d if math.isfinite(d) else None

    graded: dict[str, float | None] = {}
    for update in others:
        if update.peer_id == local.peer_id or update.peer_id in graded:
            continue
        bad = update.peer_id in rejected and update.peer_id not in used
        graded[update.peer_id] = None if bad else distance(update)
    spread = [d for d in graded.values() if d is not None]
    local_d = distance(local)
    if local_d is not None:
        spread.append(local_d)
    if not spread:
        return {pid: 0.0 for pid in graded}
    # The floor keeps a round where most updates equal the aggregate (converged models) from dividing by zero.
    scale = max(statistics.median(spread), 1e-6 * float(torch.linalg.vector_norm(target)), 1e-12)
    return {pid: 0.0 if d is None else 1.0 / (1.0 + (d / scale) ** 2) for pid, d in graded.items()}


@dataclass
class _Edge:
    weight: float
    last_round: int


class AffinityTopology(Topology):
    """Data-aware peer selection: prefer peers whose fingerprints resemble ours and whose updates helped.

    affinity = weighted mean over the available signals of label-bucket similarity (``label_weight``), feature
    moment similarity (``moment_weight``), gradient similarity (``gradient_weight``, only when both sides send
    gradient moments) and collaboration history (``history_weight``: an EMA of ``record_outcome`` qualities, graded
    by ``observe_aggregation`` from how close each sender's update came to the aggregate, that decays by
    ``edge_decay`` per round without news and is evicted after ``edge_ttl`` such rounds).

    Cold start (rounds count from 1, as the node's do): rounds 1..``blind_rounds`` choose uniformly (blind); the next
    ``learning_rounds`` explore a fraction ``exploration`` of the fanout at random (learning); after that the
    exploration fraction decays by ``exploration_decay`` per round down to ``min_exploration`` (exploiting). Exploited slots go to the highest
    affinities. The node's own fingerprint arrives through ``observe_fingerprint(self_id, body)``.
    With ``prefer_similar=false`` the fingerprint signals are inverted (seek complementary data).
    """

    name = "AffinityTopology"
    params: p.AffinityParams

    def __init__(self, params: p.Params, self_id: str, rng: random.Random) -> None:
        super().__init__(params, self_id, rng)
        self.own: Fingerprint | None = None
        self.fingerprints: dict[str, Fingerprint] = {}
        self.edges: dict[str, _Edge] = {}
        self._round = 0
        self._phase = ""

    # -- inputs
    def observe_fingerprint(self, peer_id: str, fingerprint: dict[str, Any]) -> None:
        """Raises ValueError for a malformed fingerprint (the exchange reports it, once per peer)."""
        fp = parse_fingerprint(fingerprint)
        if peer_id == self.self_id:
            self.own = fp
            return
        known = self.fingerprints.get(peer_id)
        self.fingerprints[peer_id] = fp
        if known != fp:  # at INFO the first time: a peer alternating two fingerprints would make a line each
            sim = None if self.own is None else round(similarity(self.own, fp), 3)
            emit(log, logging.INFO if known is None else logging.DEBUG, "fingerprint-received", peer=peer_id,
                 similarity=sim, entropy=round(fp.entropy, 3), samples=fp.samples)

    def record_outcome(self, peer_id: str, quality: float) -> None:
        if not math.isfinite(quality):
            return
        q = min(max(quality, 0.0), 1.0)
        edge = self.edges.get(peer_id)
        if edge is None:
            self.edges[peer_id] = _Edge(q, self._round)
            return
        current = self._edge_weight(edge)
        a = self.params.ema
        edge.weight = (1.0 - a) * current + a * q
        edge.last_round = self._round

    def observe_aggregation(self, local: PeerUpdate, others: Sequence[PeerUpdate], result: AggregationResult) -> None:
        """Grade every sender by ``contribution_qualities`` and blend the grades into the edges."""
        if self.params.history_weight <= 0:
            return
        for peer_id, quality in contribution_qualities(local, others, result).items():
            self.record_outcome(peer_id, quality)

    # -- scoring
    def _edge_weight(self, edge: _Edge) -> float:
        idle = max(self._round - edge.last_round, 0)
        return edge.weight * self.params.edge_decay**idle

    def _evict_stale(self) -> None:
        for pid in [pid for pid, e in self.edges.items() if self._round - e.last_round > self.params.edge_ttl]:
            del self.edges[pid]

    def affinity(self, peer_id: str) -> float:
        """The peer's current score in [0, 1]; 0.5 when nothing is known about it."""
        prm = self.params
        num = den = 0.0
        fp = self.fingerprints.get(peer_id)
        if fp is not None and self.own is not None:
            sims = component_similarities(self.own, fp)
            for key, weight in (("label", prm.label_weight), ("moments", prm.moment_weight), ("gradient", prm.gradient_weight)):
                value = sims[key]
                if value is not None and weight > 0:
                    num += weight * (value if prm.prefer_similar else 1.0 - value)
                    den += weight
        edge = self.edges.get(peer_id)
        if edge is not None and prm.history_weight > 0:
            num += prm.history_weight * self._edge_weight(edge)
            den += prm.history_weight
        return num / den if den > 0 else 0.5

    def phase(self, round_idx: int) -> tuple[str, float]:
        """(phase name, exploration fraction) at ``round_idx``."""
        prm = self.params
        if round_idx <= prm.blind_rounds:
            return "blind", 1.0
        if round_idx <= prm.blind_rounds + prm.learning_rounds:
            return "learning", prm.exploration
        since = round_idx - prm.blind_rounds - prm.learning_rounds - 1
        return "exploiting", max(prm.min_exploration, prm.exploration * prm.exploration_decay**since)

    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        self._round = round_idx
        self._evict_stale()
        pool = _candidates(peers, self.self_id)
        k = min(self.params.fanout, len(pool))
        phase, explore = self.phase(round_idx)
        if phase != self._phase:
            self._phase = phase
            emit(log, logging.INFO, "affinity-phase", context={"round": round_idx}, phase=phase, exploration=round(explore, 3))
        slots = explore * k
        n_explore = int(slots) + (1 if self.rng.random() < slots - int(slots) else 0)
        ranked = sorted(pool, key=lambda pid: (-self.affinity(pid), pid))
        chosen = ranked[: k - n_explore]
        rest = [pid for pid in pool if pid not in chosen]
        chosen += self.rng.sample(rest, min(n_explore, len(rest)))
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"affinity_edges": ",".join(f"{pid}|{e.weight:.6g}|{e.last_round}" for pid, e in sorted(self.edges.items()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        text = state.get("affinity_edges")
        if not text:
            return
        edges: dict[str, _Edge] = {}
        for item in str(text).split(","):
            parts = item.rsplit("|", 2)
            if len(parts) != 3:
                raise ValueError(f"affinity edge {item[:48]!r} is not id|weight|round")
            pid, weight, last = parts[0], float(parts[1]), int(parts[2])
            if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
                raise ValueError(f"affinity edge weight {weight} out of [0, 1]")
            edges[pid] = _Edge(weight, last)
        self.edges = edges
