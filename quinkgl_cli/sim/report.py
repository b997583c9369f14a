"""What a simulation leaves behind: a JSON document of every metric and PNG accuracy curves.

JSON layout (``SCHEMA``): top level ``rounds`` is a list of objects, one per training round, each with ``round``,
``mean_accuracy``, ``min_accuracy``, ``max_accuracy`` (over honest peers), ``mean_own_accuracy`` and
``min_own_accuracy`` (each peer's personal model on its own label distribution), ``mean_personal_val_accuracy``
(APFL) and ``peers`` (per-peer numbers); beside it
``consensus`` (the averaging-only phase after the last round, or null), ``final`` (what the swarm ends with),
``communication``, ``memory``, ``timing``, ``conditions`` (the field conditions, empty in lockstep), ``config`` and the effective ``manifest`` settings.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.sim.simulator import RoundSummary, SimResult

SCHEMA = "quinkgl-sim/1"


def _round_json(summary: RoundSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["peers"] = [asdict(p) for p in summary.peers]
    return data


def communication(result: SimResult) -> dict[str, Any]:
    """Bytes and model sends: the training phase per peer per round, the consensus phase on its own."""
    n = len(result.node_ids)
    rounds = len(result.rounds)
    train_bytes = sum(r.bytes_sent for r in result.rounds)
    train_sends = sum(r.model_sends for r in result.rounds)
    cons_bytes = result.consensus.bytes_sent if result.consensus else 0
    cons_sends = result.consensus.model_sends if result.consensus else 0
    return {
        "bytes_sent_total": train_bytes + cons_bytes,
        "model_sends_total": train_sends + cons_sends,
        "training_bytes": train_bytes,
        "training_model_sends": train_sends,
        "sends_per_peer_per_round": train_sends / (n * rounds) if n and rounds else 0.0,
        "consensus_steps": result.consensus_steps,
        "consensus_bytes": cons_bytes,
        "consensus_model_sends": cons_sends,
        "consensus_sends_per_peer": cons_sends / n if n else 0.0,
        "bytes_per_peer": (train_bytes + cons_bytes) / n if n else 0.0,
    }


def to_json(result: SimResult) -> dict[str, Any]:
    cfg = result.config
    m = result.manifest
    final = result.final
    return {
        "schema": SCHEMA,
        "config": {
            "peers": cfg.peers, "rounds": len(result.rounds), "rounds_asked": cfg.rounds, "partition": cfg.partition, "seed": cfg.seed, "mode": cfg.mode,
            "attackers": cfg.attackers, "attack": cfg.attack if cfg.attackers else None,
            "clients_per_round": cfg.clients_per_round if cfg.mode == "fedavg" else None,
            "pairs_per_round": cfg.pairs_per_round if cfg.mode == "pairwise" else None,
            "script_args": dict(cfg.script_args),
        },
        "manifest": {
            "name": m.name,
            "swarm_id": result.swarm_id,
            "aggregation": m.aggregation.model_dump(),
            "topology": m.topology.model_dump(),
            "training": m.training.model_dump(),
            "compression": m.compression.model_dump(),
            "privacy": m.privacy.model_dump(),
            "byzantine_f": m.byzantine_f,
            "personalization": m.personalization.model_dump(mode="json"),
        },
        "attackers": result.attackers,
        "rounds": [_round_json(r) for r in result.rounds],
        "consensus": _round_json(result.consensus) if result.consensus else None,
        "final": {
            "source": "consensus" if result.consensus else "last_round",
            "mean_accuracy": final.mean_accuracy,
            "min_accuracy": final.min_accuracy,
            "max_accuracy": final.max_accuracy,
            "mean_val_loss": final.mean_val_loss,
            "mean_own_accuracy": final.mean_own_accuracy,
            "min_own_accuracy": final.min_own_accuracy,
            "mean_personal_val_accuracy": final.mean_personal_val_accuracy,
        },
        "communication": communication(result),
        "memory": result.memory,
        "timing": result.timing,
        "conditions": result.conditions,
    }


def write_json(result: SimResult, path: Path) -> None:
    data = json.dumps(to_json(result), indent=2, allow_nan=False, default=_no_nan) + "\n"
    atomic_write_bytes(Path(path), data.encode("utf-8"))


def _no_nan(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


@dataclass
class Curve:
    """One line of a plot: accuracy per round, optionally a band (min..max) and a final point after consensus."""

    label: str
    rounds: list[int]
    mean: list[float | None]
    low: list[float | None] | None = None
    high: list[float | None] | None = None
    final: float | None = None


def own_curve_of(result: SimResult, label: str) -> Curve:
    """Personal models on their peers' own label distributions: mean, band from the worst peer."""
    return Curve(
        label=label,
        rounds=[r.round for r in result.rounds],
        mean=[r.mean_own_accuracy for r in result.rounds],
        low=[r.min_own_accuracy for r in result.rounds],
        high=[r.mean_own_accuracy for r in result.rounds],
        final=result.consensus.mean_own_accuracy if result.consensus else None,
    )


def curve_of(result: SimResult, label: str) -> Curve:
    return Curve(
        label=label,
        rounds=[r.round for r in result.rounds],
        mean=[r.mean_accuracy for r in result.rounds],
        low=[r.min_accuracy for r in result.rounds],
        high=[r.max_accuracy for r in result.rounds],
        final=result.consensus.mean_accuracy if result.consensus else None,
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display needed)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())


def _values(xs: Sequence[int], ys: Sequence[float | None]) -> tuple[list[int], list[float]]:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(curves: Sequence[Curve], path: Path, title: str, ylabel: str = "validation accuracy") -> None:
    """Accuracy per round for each curve (mean line, min..max band), the post-consensus value as a marker."""
    plot_panels([(title, curves)], path, ylabel)


def plot_panels(panels: Sequence[tuple[str, Sequence[Curve]]], path: Path, ylabel: str = "validation accuracy") -> None:
    """Side-by-side axes, one per (title, curves) panel, sharing the accuracy scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.8), squeeze=False)
    try:
        for ax, (title, curves) in zip(axes[0], panels, strict=True):
            _draw_curves(ax, curves, title, ylabel)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def _draw_curves(ax: Any, curves: Sequence[Curve], title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for c in curves:
        xs, ys = _values(c.rounds, c.mean)
        (line,) = ax.plot(xs, ys, label=c.label, linewidth=1.8)
        if c.low is not None and c.high is not None:
            pts = [(x, lo, hi) for x, lo, hi in zip(c.rounds, c.low, c.high, strict=True) if lo is not None and hi is not None]
            if pts:
                ax.fill_between([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                                color=line.get_color(), alpha=0.12, linewidth=0)
        if c.final is not None and xs:
            ax.plot([xs[-1] + 0.6], [c.final], marker="*", markersize=11, color=line.get_color(), linestyle="none")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if len(curves) > 4:  # many lines: keep the legend off the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="lower right")


def plot_result(result: SimResult, path: Path) -> None:
    cfg = result.config
    m = result.manifest
    where = f"{cfg.peers} peers, {cfg.partition}, seed {cfg.seed}"
    what = {"gossip": f"{m.aggregation.name} + {m.topology.name}", "fedavg": "centralized FedAvg",
            "pairwise": f"pairwise {m.aggregation.name} averaging over {m.topology.name} edges ({cfg.pairs_per_round} a round)",
            "local": "local only"}[cfg.mode]
    if cfg.attackers:
        what += f", {cfg.attackers} {cfg.attack} attackers"
    if m.personalization.enabled:
        what += f", personalization {m.personalization.mode}"
    label = "mean (band: min..max)" + (", * after consensus" if result.consensus else "")
    curves = [curve_of(result, f"validation set: {label}")]
    if any(r.mean_own_accuracy is not None for r in result.rounds):
        curves.append(own_curve_of(result, "own label distribution, personal model (band: worst peer..mean)"))
    plot_curves(curves, path, f"{what} ({where})", ylabel="accuracy")


def plot_xy(series: dict[str, tuple[Sequence[float], Sequence[float | None]]], path: Path, title: str,
            xlabel: str, ylabel: str, xticklabels: Sequence[str] | None = None,
            ylim: tuple[float, float] | None = None) -> None:
    """Plain line plot of named (x, y) series (final accuracy against epsilon, and the like)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for name, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if xticklabels is not None:
            first = next(iter(series.values()))[0]
            ax.set_xticks(list(first))
            ax.set_xticklabels(list(xticklabels))
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8)
        _save(fig, path)
    finally:
        plt.close(fig)
