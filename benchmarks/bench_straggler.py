"""Does a simulated straggler run agree with real daemons that have one? (issue 16)

N real `quinkgl run` daemons on loopback (`--torch-threads 1`, each with its own `--trace`), one of them (the last)
slowed by its peer script: `benchmarks/scripts/digits_slowed.py` with `sleep_per_batch=S`, the digits script
sleeping before each training batch. Their traces say how long each peer's training took per round. Then
`quinkgl simulate --partition script` on the same manifest, script and split, in virtual time with the same
gossip interval and the same straggler: the traces replayed (`simulate --trace`) when the simulator has it, else
each peer's measured training time through `--speed`. Per-round and final mean validation accuracy side by side,
compared as `bench_agreement` does (both sides from the same initial weights: run i gives `--seed i` to the daemons
and the simulator). Aim: within 3 points per round and at the end.

    python benchmarks/bench_straggler.py                        # 4 peers, classes:3, 12 rounds, 0.2 s per batch
    python benchmarks/bench_straggler.py --repeats 3               # three runs, each compared, and their means
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_agreement import compare, daemons, load_average, simulator, summarize

from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.trace import PeerArrival, Train, Transfer, read_trace, sessions

ROOT = Path(__file__).resolve().parent
SLOWED_SCRIPT = ROOT / "scripts" / "digits_slowed.py"


def trace_summary(traces: list[Path]) -> dict[str, dict[str, object]]:
    """Per peer, from its trace: training seconds per round (median, min, max), rounds, transfers, arrivals."""
    out: dict[str, dict[str, object]] = {}
    for path in traces:
        for session in sessions(read_trace(path)):
            events = session.events
            train = [e.seconds for e in events if isinstance(e, Train)]
            moved = [e for e in events if isinstance(e, Transfer)]
            out[session.header.node] = {
                "rounds_trained": len(train),
                "train_s_median": round(statistics.median(train), 4) if train else None,
                "train_s_min": round(min(train), 4) if train else None,
                "train_s_max": round(max(train), 4) if train else None,
                # what the round loop also waits for: evaluation and the end-of-round checkpoint (replayed too)
                "eval_save_s_median": round(statistics.median(e.eval_seconds + e.save_seconds for e in events
                                                              if isinstance(e, Train)), 4) if train else None,
                "transfers_ok": sum(e.ok for e in moved),
                "transfers_failed": sum(not e.ok for e in moved),
                "update_bytes": sorted({e.bytes for e in moved if e.ok}),
                "arrivals": sorted({e.peer for e in events if isinstance(e, PeerArrival)}),
            }
    return out


def simulate_flags() -> set[str]:
    """The field flags this build's `quinkgl simulate` knows, of those this benchmark can use."""
    done = subprocess.run([sys.executable, "-m", "quinkgl_cli", "simulate", "--help"], capture_output=True, text=True,
                          env={**ls.child_env(Path(tempfile.gettempdir())), "COLUMNS": "200"})
    return {flag for flag in ("--trace", "--speed", "--gossip-interval") if flag in done.stdout}


def simulate_extra(known: set[str], swarm_trace: Path, interval: float, fast: float,
                   factor: float | None, peers: int) -> tuple[list[str], str | None]:
    """The simulate flags for this straggler run, and what falls short of the replay (None: nothing)."""
    if "--trace" in known:
        return ["--trace", str(swarm_trace), "--gossip-interval", str(interval)], None
    if "--speed" in known and "--gossip-interval" in known and factor is not None:
        spec = f"straggler:{fast}:{1 / peers}:{factor}"
        return (["--speed", spec, "--gossip-interval", str(interval)],
                f"no simulate --trace: the straggler given as --speed {spec} (drawn per peer, not placed)")
    return [], "this build's quinkgl simulate has neither --trace nor --speed: the simulator half is not run"


def one_run(root: Path, args: argparse.Namespace, known: set[str], seed: int) -> dict[str, object]:
    """Daemons with one straggler, their traces, and the simulator on them; both sides with ``--seed seed``."""
    straggler = f"peer-{args.peers}"
    traces = root / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    manifest, _key, _pub, _swarm = ls.digits_manifest(root / "manifest", rounds=args.rounds, script=SLOWED_SCRIPT)

    def extra_for(name: str) -> list[str]:
        slow = ["--script-arg", f"sleep_per_batch={args.sleep_per_batch}"] if name == straggler else []
        return ["--trace", str(traces / f"{name}.trace"), *slow]

    load_before = load_average()
    real = daemons(root, manifest, args.peers, args.rounds, args.interval, args.partition,
                   script=SLOWED_SCRIPT, extra_for=extra_for, seed=seed)
    load_after = load_average()
    files = [traces / f"peer-{i + 1}.trace" for i in range(args.peers)]
    peers = trace_summary(files)
    speeds = [peers[f"peer-{i + 1}"]["train_s_median"] for i in range(args.peers)]
    fast = statistics.median(s for s in speeds[:-1] if isinstance(s, float))
    factor = round(speeds[-1] / fast, 2) if isinstance(speeds[-1], float) and fast else None
    print(f"training seconds per round (median): {dict(zip(peers, speeds, strict=True))}; straggler x{factor}")
    swarm_trace = root / "swarm.trace"
    swarm_trace.write_text("".join(f.read_text() for f in files))  # sessions in peer order: shard i's first
    extra, missing = simulate_extra(known, swarm_trace, args.interval, fast, factor, args.peers)
    sim: dict[str, object] | None = None
    if extra:
        try:
            sim = simulator(root, manifest, args.peers, args.rounds, args.partition, script=SLOWED_SCRIPT,
                            extra=extra, timeout=args.sim_timeout, seed=seed)
        except subprocess.TimeoutExpired:
            missing = f"quinkgl simulate {' '.join(extra)} did not finish within {args.sim_timeout:.0f} s"
    run: dict[str, object] = {"seed": seed, "load_average": [load_before, load_after], "straggler_factor": factor,
                              "traces": peers, "daemons": real, "simulator": sim, "missing": missing}
    if sim is not None:
        run.update(compare(real, sim))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--partition", default="classes:3")
    p.add_argument("--interval", type=float, default=1.5)
    p.add_argument("--sleep-per-batch", type=float, default=0.2, help="the straggler's added seconds per batch")
    p.add_argument("--repeats", type=int, default=1, help="runs of the whole check; their means are compared too")
    p.add_argument("--sim-timeout", type=float, default=600.0, help="seconds the simulator may take")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "straggler.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and traces here (default: a temp dir)")
    args = p.parse_args()
    known = simulate_flags()
    runs = []
    with tempfile.TemporaryDirectory(prefix="qgl-straggler-") as tmp:
        for i in range(args.repeats):
            print(f"-- run {i + 1} of {args.repeats} (--seed {i})")
            runs.append(one_run((args.workdir or Path(tmp)) / f"run-{i + 1}", args, known, seed=i))
    summary: dict[str, object] = {
        "peers": args.peers, "rounds": args.rounds, "partition": args.partition, "interval": args.interval,
        "straggler": f"peer-{args.peers}", "sleep_per_batch": args.sleep_per_batch, "repeats": args.repeats,
        "simulator_flags": sorted(known), "runs": runs,
    }
    summarize(summary, runs, args.repeats)
    for i, run in enumerate(runs, 1):
        real: dict[str, object] = run["daemons"]  # type: ignore[assignment]
        if run["simulator"] is not None:
            print(f"run {i}: max per-round difference {run['max_round_diff_points']} points over "
                  f"{run['rounds_compared']} rounds; final {run['final_diff_points']}")
        else:
            per_round: dict[int, float] = real["per_round"]  # type: ignore[assignment]
            print(f"run {i}: daemons per round " + " ".join(f"{100 * a:.1f}" for a in per_round.values())
                  + f"; final {100 * real['final']:.1f}")  # type: ignore[operator]
        if run["missing"]:
            print(f"run {i}: {run['missing']}")
        print(f"run {i}: daemon exits {real['exit_codes']}, wall {real['wall_s']} s, load average {run['load_average']}")
    if "mean" in summary:
        m: dict[str, object] = summary["mean"]  # type: ignore[assignment]
        print(f"mean: max per-round difference {m['max_round_diff_points']} points; final {m['final_diff_points']}")
    print(f"between runs (max - min): daemons {summary['spread']['daemons']}, "  # type: ignore[index]
          f"simulator {summary['spread']['simulator']}")  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
