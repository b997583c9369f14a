"""The observed graph's spectral numbers and components against a plain reference on random graphs: connected
ones, disconnected ones, isolated nodes, self-loops, repeated edges, and ids whose text sorts unlike their values."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

import numpy as np
import pytest

from quinkgl_cli.strategies.spectral import SpectralReport, analyze_adjacency, analyze_edges, components

Edge = tuple[Hashable, Hashable]


def _reference_parts(edges: list[Edge], nodes: list[Hashable]) -> list[set[Hashable]]:
    neighbours: dict[Hashable, set[Hashable]] = {n: set() for n in nodes}
    for u, v in edges:
        if u != v:
            neighbours.setdefault(u, set()).add(v)
            neighbours.setdefault(v, set()).add(u)
    parts: list[set[Hashable]] = []
    left = set(neighbours)
    while left:
        todo = [left.pop()]
        part = set(todo)
        while todo:
            for other in neighbours[todo.pop()] - part:
                part.add(other)
                todo.append(other)
        left -= part
        parts.append(part)
    return sorted(parts, key=lambda c: (-len(c), sorted(map(str, c))))


def _reference_report(edges: list[Edge], nodes: list[Hashable]) -> SpectralReport:
    """The definitions of the module docstring, written out: a loop per matrix entry."""
    parts = _reference_parts(edges, nodes)
    order = sorted(set().union(*parts), key=str) if parts else []
    n = len(order)
    at = {node: i for i, node in enumerate(order)}
    a = np.zeros((n, n))
    for u, v in edges:
        if u != v:
            a[at[u], at[v]] = a[at[v], at[u]] = 1.0
    count = int(a.sum() // 2)
    if n <= 1:
        return SpectralReport(n, count, 0.0, 1.0 if n == 1 else 0.0, 0.0, n == 1)
    if len(parts) > 1:
        return SpectralReport(n, count, 0.0, 0.0, math.inf, False)
    deg = a.sum(axis=1)
    lam = np.linalg.eigvalsh(np.diag(deg) - a)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if a[i, j]:
                w[i, j] = 1.0 / (1.0 + max(deg[i], deg[j]))
        w[i, i] = 1.0 - w[i].sum()
    mu = np.sort(np.linalg.eigvalsh(w))
    gap = max(0.0, 1.0 - max(abs(mu[-2]), abs(mu[0])))
    return SpectralReport(n, count, max(float(lam[1]), 0.0), gap, math.log(n) / gap if gap > 1e-12 else math.inf, True)


def _random_graph(seed: int) -> tuple[list[Edge], list[Hashable]]:
    rng = random.Random(seed)
    # Ints among the strings: 10 sorts before 9 by text, and the order must be the text's.
    names: list[Hashable] = [f"p{rng.randrange(10**6)}" if rng.random() < 0.7 else rng.randrange(100)
                             for _ in range(rng.randint(0, 40))]
    density = rng.choice([0.02, 0.08, 0.3])
    edges: list[Edge] = [(u, v) for u in names for v in names if rng.random() < density]
    edges += [(u, u) for u in names[:3]]  # self-loops: not edges
    edges += edges[:5]  # repeats: one edge
    isolated = [f"alone{i}" for i in range(rng.randint(0, 3))] + rng.sample(names, min(len(names), 2))
    return edges, isolated


@pytest.mark.parametrize("seed", range(60))
def test_random_graphs_match_the_reference(seed: int) -> None:
    edges, nodes = _random_graph(seed)
    # Equal to the last bit: the same matrices in the same node order go through the same eigendecompositions.
    assert analyze_edges(edges, nodes) == _reference_report(edges, nodes)
    assert components(edges, nodes) == _reference_parts(edges, nodes)


def test_the_random_graphs_include_every_case() -> None:
    """The cases above hold connected graphs, disconnected ones, ones with isolated nodes, and a degenerate one."""
    graphs = [_random_graph(seed) for seed in range(60)]
    reports = [_reference_report(*g) for g in graphs]
    assert sum(r.is_connected and r.n > 2 for r in reports) >= 5
    assert sum(not r.is_connected and r.n > 2 for r in reports) >= 20
    assert sum(any(len(p) == 1 for p in _reference_parts(*g)) for g in graphs) >= 20
    assert any(r.n <= 1 for r in reports)


def test_long_paths_and_two_rings_are_told_apart() -> None:
    """A walk must go the whole way: a path of 50 is connected, two rings of 25 are not."""
    path = [(i, i + 1) for i in range(49)]
    assert analyze_edges(path).is_connected
    assert analyze_edges(path).algebraic_connectivity == pytest.approx(2 - 2 * math.cos(math.pi / 50))
    rings = [(i, (i + 1) % 25) for i in range(25)] + [(25 + i, 25 + (i + 1) % 25) for i in range(25)]
    report = analyze_edges(rings)
    assert not report.is_connected and report.algebraic_connectivity == 0.0 and report.spectral_gap == 0.0
    assert math.isinf(report.mixing_time_upper)
    assert [len(p) for p in components(rings)] == [25, 25]
    assert components(rings)[0] == set(range(25))  # "0" < "25" by text


def test_components_with_isolated_nodes_and_ties() -> None:
    parts = components([("b", "c"), ("y", "z"), ("a", "a")], nodes=["d", "a"])
    assert parts == [{"b", "c"}, {"y", "z"}, {"a"}, {"d"}]
    assert components([]) == []
    assert components([], nodes=["x"]) == [{"x"}]


def test_a_disconnected_adjacency_needs_no_eigendecomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_: np.ndarray) -> np.ndarray:
        raise AssertionError("eigendecomposition of a disconnected graph")

    monkeypatch.setattr(np.linalg, "eigvalsh", refuse)
    a = np.zeros((4, 4))
    a[0, 1] = a[2, 3] = 1.0
    assert analyze_adjacency(a) == SpectralReport(4, 2, 0.0, 0.0, math.inf, False)
