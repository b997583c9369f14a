"""Spectral analysis against closed forms for ring, complete and path graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quinkgl_cli.strategies.spectral import (
    GossipGraphMonitor,
    analyze_adjacency,
    analyze_edges,
    complete_adjacency,
    metropolis_hastings,
    path_adjacency,
    ring_adjacency,
)


def test_ring_of_ten_matches_the_description() -> None:
    report = analyze_adjacency(ring_adjacency(10))
    assert report.algebraic_connectivity == pytest.approx(0.3820, abs=1e-4)
    assert report.fields() == {"nodes": 10, "edges": 10, "lambda2": 0.382, "gap": 0.1273, "mixing_bound": 18.08,
                               "connected": True}


@pytest.mark.parametrize("n", [3, 4, 7, 10, 25])
def test_ring_closed_form(n: int) -> None:
    lam = 2 - 2 * math.cos(2 * math.pi / n)
    report = analyze_adjacency(ring_adjacency(n))
    assert report.algebraic_connectivity == pytest.approx(lam)
    gap = lam / 3  # W = I - L/3 (for n = 3 that is J/3: gap 1)
    assert report.spectral_gap == pytest.approx(gap)
    assert report.mixing_time_upper == pytest.approx(math.log(n) / gap)
    assert report.is_connected and report.edges == n


@pytest.mark.parametrize("n", [2, 5, 12])
def test_complete_closed_form(n: int) -> None:
    report = analyze_adjacency(complete_adjacency(n))
    assert report.algebraic_connectivity == pytest.approx(n)
    assert report.spectral_gap == pytest.approx(1.0)
    assert report.edges == n * (n - 1) // 2


@pytest.mark.parametrize("n", [3, 6, 15])
def test_path_closed_form(n: int) -> None:
    lam = 2 - 2 * math.cos(math.pi / n)
    report = analyze_adjacency(path_adjacency(n))
    assert report.algebraic_connectivity == pytest.approx(lam)
    assert report.spectral_gap == pytest.approx(lam / 3)


def test_metropolis_hastings_is_doubly_stochastic() -> None:
    a = np.array([[0, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]])
    w = metropolis_hastings(a)
    assert np.allclose(w, w.T) and np.allclose(w.sum(axis=1), 1.0) and (w >= 0).all()
    assert w[0, 1] == pytest.approx(1 / 4)  # 1 / (1 + max(3, 1))


def test_disconnected_and_degenerate_graphs() -> None:
    report = analyze_edges([("a", "b"), ("c", "d")])
    assert not report.is_connected and report.algebraic_connectivity == 0.0
    assert report.spectral_gap == 0.0 and math.isinf(report.mixing_time_upper)
    assert report.fields()["mixing_bound"] is None  # JSON-safe
    assert analyze_edges([("a", "b")], nodes=["c"]).n == 3
    assert analyze_edges([]).n == 0
    assert analyze_adjacency(np.zeros((1, 1))).is_connected
    with pytest.raises(ValueError):
        analyze_adjacency(np.zeros((2, 3)))


def test_observed_edges_are_undirected_and_deduplicated() -> None:
    edges = [(f"p{i}", f"p{(i + 1) % 10}") for i in range(10)] + [(f"p{(i + 1) % 10}", f"p{i}") for i in range(10)]
    report = analyze_edges(edges + [("p0", "p0")])
    assert report.edges == 10 and report.algebraic_connectivity == pytest.approx(0.3820, abs=1e-4)


def test_monitor_windows_and_schedule() -> None:
    monitor = GossipGraphMonitor(window=2, every=3)
    monitor.record("a", "b", 1)
    monitor.record("b", "c", 2)
    monitor.record("c", "a", 3)
    monitor.record("a", "c", 3)  # the same undirected edge
    monitor.add_node("z", 1)  # alone, and out of the window by round 3
    assert [r for r in range(7) if monitor.due(r)] == [3, 6]
    report = monitor.report(3)
    assert report.edges == 2 and report.n == 3  # round 1's edge left the window, and so did "z"
    assert report.is_connected  # a - c - b: a path
    assert report.algebraic_connectivity == pytest.approx(1.0)  # P3: 2 - 2 cos(pi / 3)
    monitor.add_node("z", 4)
    later = monitor.report(4)  # only a - c is left, and "z" is back on its own
    assert later.n == 3 and later.edges == 1 and not later.is_connected
