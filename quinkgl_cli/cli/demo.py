"""`quinkgl demo`: a real local swarm (N daemon processes on loopback, non-IID digits) against each peer alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quinkgl_cli.errors import IOFailure, NodeConfigError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

_SHOWN = ("peer-discovered", "aggregated models", "round-end", "finished", "resumed", "error", "ERROR", "WARNING", "alone")


def print_peer_line(console: Console, peer: str, line: str) -> None:
    """One streamed log line behind its peer's prefix, printed as the plain text it is: hook output such as
    ``[peer-discovered] peer-3`` or a ``[/x]`` in a message is not rich markup."""
    from rich.text import Text

    console.print(Text.assemble((f"{peer:>7}", "cyan"), " | ", line), soft_wrap=True, highlight=False)


def demo(
    peers: Annotated[int, typer.Option("--peers", "-n", metavar="N", help="How many peer processes to start.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", help="Rounds each peer runs.")] = 15,
    gossip_interval: Annotated[float, typer.Option("--gossip-interval", metavar="SECONDS", help="Seconds per round.")] = 0.8,
    partition: Annotated[
        str,
        typer.Option("--partition", metavar="SCHEME",
                     help="How the digits are split: shards:K (K label shards per peer), dirichlet:ALPHA or iid."),
    ] = "shards:3",
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Workspace for keys, logs, checkpoints and final models (default: ./quinkgl-demo, "
                     "or ./quinkgl-demo-N when that exists).", metavar="DIR"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream every log line, not just the main events.")] = False,
) -> None:
    """Start a local swarm on loopback and show it learning what no single peer can."""
    if not 2 <= peers <= 16:
        raise UsageError(f"--peers {peers} must be between 2 and 16")
    if rounds < 1 or not gossip_interval > 0:
        raise UsageError("--rounds must be at least 1 and --gossip-interval positive")
    from quinkgl_cli.sim.partition import parse_scheme

    try:
        scheme = str(parse_scheme(partition))
    except UsageError as exc:
        raise UsageError(f"--partition: {exc.message}", exc.hint) from exc

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from quinkgl_cli.node import localswarm as ls

    console = Console(highlight=False)
    errors = Console(stderr=True, highlight=False)
    ls.check_script(ls.DIGITS_SCRIPT)
    root = workspace(workdir)
    started = time.monotonic()
    swarm: list[ls.PeerProcess] = []
    try:
        console.print(f"[bold]workspace[/bold] {escape(str(root))} (keys, logs, checkpoints and final models stay here)")
        console.print("$ quinkgl keygen --output creator.key", markup=False)
        console.print(
            "$ quinkgl manifest create --name digits-demo --from-script digits_peer_script.py --task-type class "
            "--label-type integer --aggregation FedAvg --topology FullTopology --training-param local_epochs=1 "
            "--training-param final_consensus_steps=1 --sign-with creator.key --output digits-demo.qgl",
            markup=False,
        )
        manifest, _key, pub, swarm_id = ls.digits_manifest(root)
        console.print(f"$ quinkgl manifest verify digits-demo.qgl --trusted-pubkey {pub}", markup=False)
        console.print(f"  Manifest valid. Swarm ID: {swarm_id}", markup=False)
        # --no-resume: a reused --workdir holds an earlier demo's checkpoints, of another swarm (a new key each run).
        swarm = ls.start_swarm(root, manifest, peers, rounds, gossip_interval, scheme, extra=["--no-resume"])

        def relaunched(p: ls.PeerProcess, old: int) -> None:
            console.print(f"{p.name}: port {old} was taken meanwhile; started again on 127.0.0.1:{p.port}", markup=False)

        ls.ensure_started(swarm, on_relaunch=relaunched)
        for p in swarm:
            console.print(f"started {p.name} on 127.0.0.1:{p.port} shard={p.script_args['shard']} partition={scheme}",
                          markup=False)

        lock = threading.Lock()

        def emit(peer: str, line: str) -> None:
            if verbose or any(key in line for key in _SHOWN):
                with lock:
                    print_peer_line(console, peer, line)

        def streaming_failed(exc: BaseException) -> None:
            with lock:
                errors.print(f"warning: log streaming stopped ({type(exc).__name__}: {exc}); the peers keep running, "
                             f"their logs are in {root / 'logs'}", markup=False)

        solo: dict[str, ls.SoloResult] = {}

        def baselines() -> None:
            # Trained while the peers idle between rounds, not while they start: start-up is the CPU-heavy part.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all("first-round" in p.text() or p.proc.poll() is not None
                                                          for p in swarm):
                time.sleep(0.2)
            for p in swarm:
                solo[p.name] = ls.train_alone(manifest, ls.DIGITS_SCRIPT, p.script_args, rounds, node_id=p.name)

        stop = threading.Event()
        follower = ls.follow(swarm, emit, stop, streaming_failed)
        solo_thread = threading.Thread(target=baselines, name="solo-baselines", daemon=True)
        solo_thread.start()
        codes = ls.wait_all(swarm, timeout=120 + rounds * gossip_interval * 3)
        stop.set()
        follower.join(timeout=5)
        solo_thread.join()
        failed = [f"{p.name} (exit {c})" for p, c in zip(swarm, codes, strict=True) if c != 0]
        if failed:
            raise NodeConfigError(f"demo peers failed: {', '.join(failed)}", f"see the logs in {root / 'logs'}")

        table = Table(title=f"digits, {peers} peers, {rounds} rounds, {'IID' if scheme == 'iid' else 'non-IID'} ({scheme})")
        for col in ("peer", "digits it holds", "alone: val accuracy", "in the swarm", "gain (points)"):
            table.add_column(col, justify="right" if col != "peer" else "left")
        gains = []
        for p in swarm:
            swarm_acc = p.finished_accuracy()
            alone = solo[p.name].val_accuracy
            gain = (swarm_acc - alone) if swarm_acc is not None and alone is not None else None
            gains.append(gain)
            table.add_row(
                p.name,
                ",".join(str(v) for v in solo[p.name].labels),
                f"{alone:.1%}" if alone is not None else "-",
                f"{swarm_acc:.1%}" if swarm_acc is not None else "-",
                f"{gain * 100:+.1f}" if gain is not None else "-",
            )
        console.print(table)
        console.print(
            "Every peer validates on all ten digits. Alone, a peer only learns the few it holds; in the swarm, "
            "models travel between peers (never the data) and every peer learns them all."
        )
        for p in swarm:
            console.print(f"final model of {p.name}: {p.final_model_path()}", markup=False)
        console.print(f"done in {time.monotonic() - started:.0f} s; workspace {root} (remove it when done)", markup=False)
    finally:
        ls.stop_all(swarm)


def workspace(workdir: Path | None) -> Path:
    """The demo's directory: ``workdir``, else ``./quinkgl-demo`` or the first free ``./quinkgl-demo-N``, so the
    logs, checkpoints and final models a run names are there for the user to look at afterwards."""
    if workdir is not None:
        root = workdir
    else:
        root = Path("quinkgl-demo")
        n = 2
        while root.exists():
            root = Path(f"quinkgl-demo-{n}")
            n += 1
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IOFailure(f"cannot create the demo workspace {root}: {exc.strerror}", "pass --workdir DIR somewhere writable") from exc
    return root.resolve()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
