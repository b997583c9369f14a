"""Spectral analysis of gossip graphs: how fast does averaging over this graph mix?

For an undirected graph with adjacency A (symmetrized, unweighted, no self-loops):

- algebraic connectivity: lambda_2 of the Laplacian L = D - A (Fiedler value; > 0 iff connected);
- Metropolis-Hastings mixing matrix W (Boyd et al., 2006): W_ij = 1 / (1 + max(d_i, d_j)) on edges,
  W_ii = 1 - sum_j W_ij; it is symmetric and doubly stochastic, so gossip averaging with it converges to the mean;
- spectral gap: 1 - max(|lambda_2(W)|, |lambda_n(W)|), the rate at which disagreement shrinks per step
  (Koloskova et al., 2020); 0 for a disconnected graph;
- mixing-time bound: log(n) / gap steps (infinite when the gap is 0).

Closed forms the tests check: ring C_n: lambda_2 = 2 - 2 cos(2 pi / n), gap = lambda_2 / 3 (W = I - L/3);
complete K_n: lambda_2 = n, gap = 1; path P_n: lambda_2 = 2 - 2 cos(pi / n), gap = lambda_2 / 3.
A ring of 10 gives lambda_2 = 0.3820, gap = 0.1273, mixing bound 18.08.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpectralReport:
    n: int
    edges: int
    algebraic_connectivity: float
    spectral_gap: float
    mixing_time_upper: float
    is_connected: bool

    def fields(self) -> dict[str, int | float | bool | None]:
        """JSON-safe numbers (an infinite mixing bound is None) for logs and round metrics."""
        return {
            "nodes": self.n,
            "edges": self.edges,
            "lambda2": round(self.algebraic_connectivity, 4),
            "gap": round(self.spectral_gap, 4),
            "mixing_bound": round(self.mixing_time_upper, 2) if math.isfinite(self.mixing_time_upper) else None,
            "connected": self.is_connected,
        }


def _clean(adjacency: np.ndarray) -> np.ndarray:
    a = np.asarray(adjacency, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square matrix, got shape {a.shape}")
    a = ((a != 0) | (a.T != 0)).astype(np.float64)
    np.fill_diagonal(a, 0.0)
    return a


def laplacian(adjacency: np.ndarray) -> np.ndarray:
    a = _clean(adjacency)
    return np.diag(a.sum(axis=1)) - a


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """The Metropolis-Hastings gossip matrix of the (symmetrized) graph."""
    return _metropolis_hastings(_clean(adjacency))


def _metropolis_hastings(a: np.ndarray) -> np.ndarray:
    deg = a.sum(axis=1)
    w = a / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def analyze_adjacency(adjacency: np.ndarray) -> SpectralReport:
    """Spectral numbers of a graph given by its adjacency matrix (any nonzero entry is an edge)."""
    a = _clean(adjacency)
    n = a.shape[0]
    edges = int(a.sum() // 2)
    if n <= 1:
        return SpectralReport(n, edges, 0.0, 1.0 if n == 1 else 0.0, 0.0, n == 1)
    if not _reached(a, 0).all():
        # Both numbers are 0 by definition: no eigendecomposition (the graphs of a split, `node.splitwatch`).
        return SpectralReport(n, edges, 0.0, 0.0, math.inf, False)
    lap_eigs = np.linalg.eigvalsh(np.diag(a.sum(axis=1)) - a)
    lambda2 = float(max(lap_eigs[1], 0.0))
    w_eigs = np.sort(np.linalg.eigvalsh(_metropolis_hastings(a)))[::-1]
    slem = float(max(abs(w_eigs[1]), abs(w_eigs[-1])))
    gap = max(0.0, 1.0 - slem)
    mixing = math.log(n) / gap if gap > 1e-12 else math.inf
    return SpectralReport(n, edges, lambda2, gap, mixing, True)


def _reached(a: np.ndarray, start: int) -> np.ndarray:
    """Which nodes of the symmetric 0/1 adjacency ``a`` a walk from ``start`` reaches (breadth first, a frontier a
    step: as many steps as the graph's diameter)."""
    seen = np.zeros(a.shape[0], dtype=bool)
    seen[start] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = a[frontier].any(axis=0) & ~seen
        seen |= frontier
    return seen


def _indexed(edges: Iterable[tuple[Hashable, Hashable]],
             nodes: Iterable[Hashable]) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """The graph's nodes sorted by their text (ties in the order first seen: ``nodes``, then the edges' ends) and
    its edges as index arrays into them; self-loops dropped, their node with them unless named elsewhere."""
    index: dict[Hashable, int] = {}
    for node in nodes:
        index.setdefault(node, len(index))
    ends: list[int] = []
    for u, v in edges:
        if u != v:
            ends.append(index.setdefault(u, len(index)))
            ends.append(index.setdefault(v, len(index)))
    order = sorted(index, key=str)
    position = np.empty(len(order), dtype=np.intp)
    position[[index[node] for node in order]] = np.arange(len(order))
    pairs = position[np.asarray(ends, dtype=np.intp)].reshape(-1, 2)
    return order, pairs[:, 0], pairs[:, 1]


def _adjacency(edges: Iterable[tuple[Hashable, Hashable]],
               nodes: Iterable[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    order, rows, cols = _indexed(edges, nodes)
    a = np.zeros((len(order), len(order)))
    a[rows, cols] = 1.0
    a[cols, rows] = 1.0
    return order, a


def analyze_edges(edges: Iterable[tuple[Hashable, Hashable]], nodes: Iterable[Hashable] = ()) -> SpectralReport:
    """Spectral numbers of the undirected graph of observed (sender, receiver) pairs, plus isolated ``nodes``."""
    return analyze_adjacency(_adjacency(edges, nodes)[1])


def components(edges: Iterable[tuple[Hashable, Hashable]], nodes: Iterable[Hashable] = ()) -> list[set[Hashable]]:
    """The connected components of the undirected graph of ``edges`` plus ``nodes``, largest first."""
    order, a = _adjacency(edges, nodes)
    left = np.ones(len(order), dtype=bool)
    parts: list[set[Hashable]] = []
    while left.any():
        part = _reached(a, int(np.argmax(left)))
        parts.append({order[i] for i in np.flatnonzero(part).tolist()})
        left &= ~part
    return sorted(parts, key=lambda c: (-len(c), sorted(map(str, c))))


def ring_adjacency(n: int) -> np.ndarray:
    a = np.zeros((n, n))
    for i in range(n):
        if n > 1:
            a[i, (i + 1) % n] = a[(i + 1) % n, i] = 1.0
    return a


def path_adjacency(n: int) -> np.ndarray:
    a = np.zeros((n, n))
    for i in range(n - 1):
        a[i, i + 1] = a[i + 1, i] = 1.0
    return a


def complete_adjacency(n: int) -> np.ndarray:
    return np.ones((n, n)) - np.eye(n)


class GossipGraphMonitor:
    """The gossip graph a running peer has observed: undirected model exchanges of the last ``window`` rounds.

    The node records the exchanges it takes part in (its sends, the senders it aggregated) and the ones its peers
    report (the recipients each update names); every ``every`` rounds it analyzes the graph and logs a ``spectral``
    line. One peer sees its own edges and its neighbours' (two hops): the numbers describe the part of the swarm it
    can see, and edges not seen for ``window`` rounds age out with their nodes (a peer that left stops counting).
    """

    def __init__(self, window: int = 10, every: int = 5) -> None:
        if window < 1 or every < 1:
            raise ValueError("window and every must be >= 1")
        self.window = window
        self.every = every
        self._edges: dict[tuple[str, str], int] = {}  # (smaller id, larger id) -> last round seen
        self._nodes: dict[str, int] = {}  # nodes added on their own (the observer) -> last round seen

    def record(self, sender: str, receiver: str, round_idx: int) -> None:
        if sender == receiver:
            return
        key = (sender, receiver) if sender < receiver else (receiver, sender)
        self._edges[key] = max(round_idx, self._edges.get(key, round_idx))

    def add_node(self, node: str, round_idx: int) -> None:
        self._nodes[node] = max(round_idx, self._nodes.get(node, round_idx))

    def due(self, round_idx: int) -> bool:
        """Whether ``round_idx`` is one of the rounds to analyze (every ``every``-th)."""
        return round_idx > 0 and round_idx % self.every == 0

    def _trim(self, round_idx: int) -> None:
        oldest = round_idx - self.window
        self._edges = {k: r for k, r in self._edges.items() if r > oldest}
        self._nodes = {k: r for k, r in self._nodes.items() if r > oldest}

    def edges(self, round_idx: int) -> list[tuple[str, str]]:
        """The exchanges seen in the window ending at ``round_idx`` (without forgetting older ones)."""
        oldest = round_idx - self.window
        return [k for k, r in self._edges.items() if r > oldest]

    def report(self, round_idx: int) -> SpectralReport:
        self._trim(round_idx)
        return analyze_edges(self._edges, self._nodes)
