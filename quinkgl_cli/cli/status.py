"""`quinkgl status`: what the daemons running on this host as this user are doing (read from their status sockets)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quinkgl_cli.errors import UsageError

if TYPE_CHECKING:
    from quinkgl_cli.ops.status_client import Reply


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} GB"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render(replies: list[Reply], now: float) -> str:
    """The text table: a line per daemon, then one indented line per peer it knows (its reachability)."""
    from quinkgl_cli.ops.snapshot import metric_number  # pydantic: not on `quinkgl --help`'s path

    header = ("NODE", "STATE", "ROUND", "PEERS", "LAST AGGREGATION", "VAL ACC", "OWN ACC", "SENT", "RECEIVED", "EPSILON", "LISTEN")
    rows: list[tuple[str, ...]] = [header]
    details: dict[int, list[str]] = {}
    for reply in replies:
        s = reply.snapshot
        if s is None:
            state, note = ("starting", "") if reply.error == "starting" else ("no answer", reply.error or "")
            rows.append((reply.node_id or reply.socket.name, state, note, "", "", "", "", "", "", "", ""))
            continue
        age = now - s.updated_at
        agg = s.last_aggregation
        rows.append((
            s.node_id, s.state, f"{s.round}/{s.rounds}" if s.rounds is not None else str(s.round), str(len(s.peers)),
            (f"round {agg.round}, {_ago(now - agg.at) if agg.at is not None else 'before restart'}" if agg
             else "none yet"), _num(s.val_accuracy), _num(metric_number(s.round_metrics.get("own_accuracy"))),
            _bytes(s.bytes_sent), _bytes(s.bytes_received), _num(s.dp_epsilon_spent), s.listen,
        ))
        details[len(rows) - 1] = [
            f"  peer {p.node_id} at {p.address or '?'}, heard from "
            f"{_ago(p.seen_seconds_ago + age) if p.seen_seconds_ago is not None else 'never'}"
            for p in s.peers
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        lines.extend(details.get(index, []))
    return "\n".join(lines)


def status(
    nodes: Annotated[list[str] | None, typer.Argument(help="Only these node ids (default: all).", metavar="NODE", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of the daemons' states.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until interrupted.")] = False,
    interval: Annotated[float, typer.Option("--interval", metavar="SECONDS", help="Seconds between refreshes with --watch.")] = 2.0,
    count: Annotated[int | None, typer.Option("--count", metavar="N", help="With --watch: stop after this many refreshes.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="The --state-dir the daemons run with (default: $QUINKGL_HOME).", metavar="DIR")
    ] = None,
) -> None:
    """Show the round, peers, last aggregation, accuracy, bytes and privacy spent of each running daemon."""
    import json

    from quinkgl_cli.ops.registry import runtime_dir
    from quinkgl_cli.ops.status_client import query

    if not interval > 0:
        raise UsageError(f"--interval {interval} must be positive")
    if count is not None and (count < 1 or not watch):
        raise UsageError("--count needs --watch and must be at least 1")
    directory = runtime_dir(state_dir)
    wanted = set(nodes or [])
    shown = 0
    while True:
        running = query(directory)
        replies = [r for r in running if not wanted or _node_of(r) in wanted]
        if as_json:
            docs = [r.to_json() for r in replies]
            typer.echo(json.dumps(docs, separators=(",", ":")) if watch else json.dumps(docs, indent=2))
        else:
            if watch and sys.stdout.isatty():
                typer.echo("\x1b[H\x1b[2J", nl=False)  # clear the screen: the table replaces the last one
            text = render(replies, time.time()) if replies else _none_found(wanted, running, directory)
            typer.echo(text + ("\n" if watch and not sys.stdout.isatty() else ""))
        shown += 1
        if not watch or (count is not None and shown >= count):
            return
        time.sleep(interval)


def _node_of(reply: Reply) -> str | None:
    return reply.snapshot.node_id if reply.snapshot is not None else reply.node_id


def _none_found(wanted: set[str], running: list[Reply], directory: Path) -> str:
    if wanted and running:
        others = ", ".join(sorted(str(_node_of(r) or r.socket.name) for r in running))
        return f"no quinkgl daemon named {', '.join(sorted(wanted))} is running (running here: {others})"
    return (f"no quinkgl daemon is running (looked in {directory}; daemons started with --state-dir or $QUINKGL_HOME"
            " are found with the same --state-dir)")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
