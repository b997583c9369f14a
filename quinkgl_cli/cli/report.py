"""`quinkgl report`: sum up a run from its `--metrics-file`, and draw its curves with --plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from quinkgl_cli.errors import IOFailure


def report(
    metrics: Annotated[list[Path], typer.Argument(help="Metrics files written by `quinkgl run --metrics-file`.", metavar="METRICS", show_default=False)],
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw accuracy, loss, peers and bytes per round (PNG).", metavar="FILE")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-node summary as JSON.")] = False,
) -> None:
    """Summarize each node's rounds in one or more metrics files; --plot draws the curves."""
    import json

    from quinkgl_cli.ops.metrics_file import read_metrics
    from quinkgl_cli.ops.report import plot_runs, summarize

    if plot is not None and not plot.parent.is_dir():
        raise IOFailure(f"cannot write {plot}: {plot.parent} is not a directory", "create it first")
    runs = [run for path in metrics for run in read_metrics(path)]
    summaries = [summarize(run) for run in runs]
    if as_json:
        typer.echo(json.dumps([asdict(s) for s in summaries], indent=2))
    else:
        for s in summaries:
            final = "-" if s.final_val_accuracy is None else f"{s.final_val_accuracy:.4f}"
            best = "-" if s.best_val_accuracy is None else f"{s.best_val_accuracy:.4f}"
            own = "" if s.final_own_accuracy is None else f", own_accuracy final {s.final_own_accuracy:.4f}"
            typer.echo(f"{s.node}: rounds {s.first_round}-{s.last_round} ({s.rounds} on file), val_accuracy final "
                       f"{final} best {best}{own}, {s.bytes_sent} bytes sent, swarm {s.swarm}")
    if plot is not None:
        plot_runs(runs, plot)
        if not as_json:
            typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
