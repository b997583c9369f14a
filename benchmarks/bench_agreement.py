"""Do the simulator and real daemons agree? One split run both ways (issue 11, goal 4).

Real `quinkgl run` daemons on loopback, each given its shard through the script's own arguments
(`shard=i num_shards=N partition=P`), and `quinkgl simulate --partition script` with the same manifest, script and
arguments: per-round mean validation accuracy of the peers and the final mean, side by side, with the largest
per-round difference. Aim: within 3 points per round and at the end.

Both sides start from the same initial weights (`--seed`, 0 by default, given to every daemon and to the simulator):
a daemon otherwise draws them from the swarm id, new with every run's manifest, and two starting points alone move the
first rounds by ten points and more, which says nothing about the simulator.

    python benchmarks/bench_agreement.py                       # 4 peers, classes:3, 12 rounds
    python benchmarks/bench_agreement.py --peers 4 --partition shards:2 --rounds 10
    python benchmarks/bench_agreement.py --repeats 3             # seeds 0, 1, 2; the means compared too
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from quinkgl_cli.node import localswarm as ls

ROOT = Path(__file__).resolve().parent
_ROUND_END = re.compile(r"\bround=(\d+) round-end .*?\bval_accuracy=([0-9.]+)")


def daemons(root: Path, manifest: Path, peers: int, rounds: int, interval: float, partition: str,
            script: Path = ls.DIGITS_SCRIPT, extra_for: Callable[[str], Sequence[str]] = lambda name: (),
            seed: int = 0) -> dict[str, object]:
    """Real daemons' per-round mean validation accuracy and final mean (``extra_for(name)``: one peer's own flags;
    ``seed``: every daemon's ``--seed``, the initial weights the simulator's ``--seed`` gives too)."""
    started = time.monotonic()
    procs = ls.start_swarm(root / "daemons", manifest, peers, rounds, interval, partition, script=script,
                           extra=["--seed", str(seed)], extra_for=extra_for)
    try:
        ls.ensure_started(procs)
        codes = ls.wait_all(procs, timeout=120 + rounds * interval * 20)
    finally:
        ls.stop_all(procs)
    for p, code in zip(procs, codes, strict=True):
        if code != 0:
            raise RuntimeError(f"{p.name} exited {code}: {p.text()[-1500:]}")
    per_round: dict[int, list[float]] = {}
    for p in procs:
        seen = {int(r): float(a) for r, a in _ROUND_END.findall(p.text())}  # a resent round keeps its last line
        for r, a in seen.items():
            per_round.setdefault(r, []).append(a)
    finals = [p.finished_accuracy() for p in procs]
    return {
        "exit_codes": codes,
        "wall_s": round(time.monotonic() - started, 1),
        "per_round": {r: sum(v) / len(v) for r, v in sorted(per_round.items()) if len(v) == peers},
        "final": sum(f for f in finals if f is not None) / peers if all(f is not None for f in finals) else None,
    }


def simulator(root: Path, manifest: Path, peers: int, rounds: int, partition: str,
              script: Path = ls.DIGITS_SCRIPT, extra: Sequence[str] = (), timeout: float | None = None,
              seed: int = 0) -> dict[str, object]:
    """`quinkgl simulate --partition script` on the same split; ``extra``: more simulate flags (field conditions);
    a run past ``timeout`` seconds raises `subprocess.TimeoutExpired`."""
    out = root / "sim.json"
    cmd = [sys.executable, "-m", "quinkgl_cli", "simulate", "--manifest", str(manifest), "--script",
           str(script), "--peers", str(peers), "--rounds", str(rounds), "--partition", "script",
           "--script-arg", f"partition={partition}", "--seed", str(seed), "--json", str(out), *extra]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ls.child_env(root / "sim-home"), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"simulate exited {done.returncode}: {done.stdout[-1500:]} {done.stderr[-1500:]}")
    data = json.loads(out.read_text())
    consensus = data.get("consensus")
    return {
        "wall_s": round(time.monotonic() - started, 1),
        "per_round": {int(r["round"]): r["mean_accuracy"] for r in data["rounds"] if r["mean_accuracy"] is not None},
        "final": (consensus or data["rounds"][-1])["mean_accuracy"],
    }


def compare(real: dict[str, object], sim: dict[str, object]) -> dict[str, object]:
    """Print daemons against simulator round by round; the largest per-round and the final difference, in points."""
    real_rounds: dict[int, float] = real["per_round"]  # type: ignore[assignment]
    sim_rounds: dict[int, float] = sim["per_round"]  # type: ignore[assignment]
    print(f"{'round':>5} {'daemons':>8} {'simulator':>9} {'diff':>6}")
    diffs = []
    for r in sorted(set(real_rounds) & set(sim_rounds)):
        d = 100 * (real_rounds[r] - sim_rounds[r])
        diffs.append(abs(d))
        print(f"{r:>5} {100 * real_rounds[r]:>8.1f} {100 * sim_rounds[r]:>9.1f} {d:>+6.1f}")
    final_diff = (None if real["final"] is None or sim["final"] is None
                  else round(100 * (real["final"] - sim["final"]), 1))  # type: ignore[operator]
    print(f"final {100 * real['final']:>8.1f} {100 * sim['final']:>9.1f} {final_diff:>+6}"  # type: ignore[operator]
          if final_diff is not None else "final: missing")
    return {"max_round_diff_points": round(max(diffs), 1) if diffs else None, "final_diff_points": final_diff,
            "rounds_compared": len(diffs)}


def mean_of(runs: list[dict[str, object]]) -> dict[str, object] | None:
    """Per-round and final accuracy averaged over ``runs`` (the rounds all of them have); None if any is missing."""
    if not runs or any(r is None or r["final"] is None for r in runs):
        return None
    rounds = set.intersection(*(set(r["per_round"]) for r in runs))  # type: ignore[call-overload]
    return {"per_round": {k: statistics.fmean(r["per_round"][k] for r in runs) for k in sorted(rounds)},  # type: ignore[index]
            "final": statistics.fmean(r["final"] for r in runs)}  # type: ignore[misc]


def spread(runs: list[dict[str, object]]) -> dict[str, float] | None:
    """How far runs of the same side differ from each other (the largest per-round and the final max - min, in
    points): the noise a comparison with the other side cannot get below."""
    if len(runs) < 2 or mean_of(runs) is None:
        return None
    rounds = set.intersection(*(set(r["per_round"]) for r in runs))  # type: ignore[call-overload]
    per = [max(r["per_round"][k] for r in runs) - min(r["per_round"][k] for r in runs) for k in rounds]  # type: ignore[index]
    finals = [r["final"] for r in runs]
    return {"max_round_points": round(100 * max(per), 1), "final_points": round(100 * (max(finals) - min(finals)), 1)}  # type: ignore[type-var, operator]


def summarize(summary: dict[str, object], runs: list[dict[str, object]], repeats: int) -> None:
    """Adds to ``summary`` the runs' mean curves compared side by side (with more than one run) and each side's
    run-to-run spread. A run whose simulator side is missing leaves the means uncompared (they would average
    different runs) and counts for the daemons' spread only."""
    real = [r["daemons"] for r in runs]
    sims = [r["simulator"] for r in runs if r["simulator"] is not None]
    real_mean = mean_of(real)  # type: ignore[arg-type]
    sim_mean = mean_of([r["simulator"] for r in runs])  # type: ignore[misc]
    if repeats > 1 and real_mean is not None and sim_mean is not None:
        print(f"-- mean of {repeats} runs")
        summary["mean"] = {"daemons": real_mean, "simulator": sim_mean, **compare(real_mean, sim_mean)}
    summary["spread"] = {"daemons": spread(real), "simulator": spread(sims)}  # type: ignore[arg-type]


def load_average() -> float:
    """The machine's 1-minute load average: daemons' timing (and so which updates they aggregate) depends on it."""
    return round(os.getloadavg()[0], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--partition", default="classes:3")
    p.add_argument("--interval", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=1, help="runs with seeds 0..K-1 (both sides); their means compared too")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "agreement.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep the daemons' logs here (default: a temp dir)")
    args = p.parse_args()
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="qgl-agree-") as tmp:
        for seed in range(args.repeats):
            print(f"-- run {seed + 1} of {args.repeats} (--seed {seed})")
            root = (args.workdir or Path(tmp)) / f"run-{seed + 1}"
            manifest, _key, _pub, _swarm = ls.digits_manifest(root / "manifest", rounds=args.rounds)
            load_before = load_average()
            real = daemons(root, manifest, args.peers, args.rounds, args.interval, args.partition, seed=seed)
            load_after = load_average()
            sim = simulator(root, manifest, args.peers, args.rounds, args.partition, seed=seed)
            runs.append({"seed": seed, "load_average": [load_before, load_after], "daemons": real, "simulator": sim,
                         **compare(real, sim)})
    summary: dict[str, object] = {"peers": args.peers, "rounds": args.rounds, "partition": args.partition,
                                  "interval": args.interval, "repeats": args.repeats, "runs": runs}
    summarize(summary, runs, args.repeats)
    for run in runs:
        real = run["daemons"]  # type: ignore[assignment]
        print(f"seed {run['seed']}: max per-round difference {run['max_round_diff_points']} points over "
              f"{run['rounds_compared']} rounds; final {run['final_diff_points']}; daemon exits {real['exit_codes']}, "  # type: ignore[index]
              f"load average {run['load_average']}")
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
