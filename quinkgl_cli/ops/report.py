"""`quinkgl report`: a run's metrics file summed up per node, and drawn as curves (accuracy, loss, peers, bytes)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.ops.metrics_file import MetricsRun
from quinkgl_cli.ops.snapshot import metric_number

# (title, y label, metric keys drawn in it): validation solid, training dashed, the personal model on the peer's own
# distribution (personalized swarms) dotted.
PANELS = (
    ("accuracy", "accuracy", ("val_accuracy", "accuracy", "own_accuracy")),
    ("loss", "loss", ("val_loss", "loss")),
    ("peers aggregated", "peers", ("peers",)),
    ("model bytes per round", "bytes", ("bytes_sent", "bytes_received")),
)


@dataclass(frozen=True)
class NodeSummary:
    node: str
    swarm: str
    rounds: int  # rows on file
    first_round: int
    last_round: int
    final_val_accuracy: float | None
    best_val_accuracy: float | None
    bytes_sent: int
    final_own_accuracy: float | None = None  # personalized swarms: the personal model on the peer's own distribution


def summarize(run: MetricsRun) -> NodeSummary:
    """The node's summary: bytes over its rounds and final consensuses (the ``finished`` line's total); the final
    accuracies after the last final consensus when it followed the last round on file (the ``finished`` line's)."""
    rows = [*run.rows, *run.consensus]
    accs = [a for a in (metric_number(r.get("val_accuracy")) for r in rows) if a is not None]
    sent = sum(int(v) for v in (metric_number(r.get("bytes_sent")) for r in rows) if v is not None)
    last = run.rows[-1]
    if run.consensus and run.consensus[-1]["round"] >= last["round"]:
        last = run.consensus[-1]
    return NodeSummary(run.node, run.swarm, len(run.rows), run.rows[0]["round"], run.rows[-1]["round"],
                       metric_number(last.get("val_accuracy")), max(accs) if accs else None, sent,
                       metric_number(last.get("own_accuracy")))


def plot_runs(runs: list[MetricsRun], path: Path) -> None:
    """One PNG: a panel per `PANELS` entry, a line per node and metric; a metric no row carries is left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), squeeze=False)
    try:
        for ax, (title, ylabel, keys) in zip(axes.flat, PANELS, strict=True):
            for run in runs:
                for style, key in zip(("-", "--", ":"), keys, strict=False):
                    pts = [(r["round"], v) for r in run.rows if (v := metric_number(r.get(key))) is not None]
                    if pts:
                        label = key if len(runs) == 1 else f"{run.node} {key}"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, linewidth=1.6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        swarms = sorted({r.swarm for r in runs})
        fig.suptitle(f"{', '.join(r.node for r in runs)} in {', '.join(s[:19] for s in swarms)}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(Path(path), buf.getvalue())
    finally:
        plt.close(fig)
