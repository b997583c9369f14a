"""Where a local simulation's CPU goes: the process clock for building the swarm, its training rounds and the
consensus phase, one point per process.

    python benchmarks/bench_sim_phases.py                        # 1,000 peers x 3 rounds
    python benchmarks/bench_sim_phases.py --peers 3000 --rounds 3
    python benchmarks/bench_sim_phases.py --peers 1000 --rounds 20 --out benchmarks/results/x.json

The workload of `bench_scale.py`'s large points: the digits MLP on digits' training set repeated 7 times
(`scripts/digits_tiled.py`), IID split, seed 1, the default manifest (4 local epochs, one exchange a round, the
6-step consensus phase), one torch thread. CPU seconds are the process's own (``time.process_time``), so other
tenants of a shared machine inflate them less than wall time (they still do, through shared caches and cores): each
point records the load average beside them, and comparisons of two versions of the code should run side by side.
``per_round_s`` is the rounds' CPU divided by their number; a run of R rounds on N peers costs about
``build_s + R * per_round_s + consensus_s``, each term linear in N; ``round_cpu_s`` is each round's own CPU (every
``spectral_every``-th round, 5 by default, also analyzes each node's observed gossip graph). Writes
benchmarks/results/sim_phases.json, or ``--out`` (merged with the points it holds, keyed by peers and rounds), and
prints the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from simkit import RESULTS, digits_manifest, quiet

from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.results import RoundSummary
from quinkgl_cli.sim.simulator import SimConfig, Simulator

OUT = RESULTS / "sim_phases.json"
TILED = Path(__file__).resolve().parent / "scripts" / "digits_tiled.py"


def measure(peers: int, rounds: int) -> dict[str, Any]:
    quiet()
    torch.set_num_threads(1)  # the build too (the run sets the simulator's own, one by default)
    script = load_script(TILED)
    config = SimConfig(peers=peers, rounds=rounds, partition="iid", seed=1, script_args={"repeat": "7"})
    marks: dict[str, float] = {}

    def progress(summary: RoundSummary) -> None:
        marks[f"{summary.phase}-{summary.round}"] = time.process_time()

    sim = Simulator(script, digits_manifest(script), config, progress)
    wall = time.perf_counter()
    start = time.process_time()
    sim.build()
    built = time.process_time()
    result = sim.run()
    end = time.process_time()
    trained = marks[f"train-{rounds}"]
    ends = [built] + [marks[f"train-{r}"] for r in range(1, rounds + 1)]
    return {
        "peers": peers, "rounds": rounds, "build_s": built - start, "rounds_s": trained - built,
        "per_round_s": (trained - built) / rounds,
        "round_cpu_s": [round(b - a, 3) for a, b in zip(ends, ends[1:], strict=False)], "consensus_s": end - trained, "cpu_s": end - start,
        "wall_s": time.perf_counter() - wall, "load_average": list(os.getloadavg()),
        "final_mean_accuracy": result.final.mean_accuracy, "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    point = measure(args.peers, args.rounds)
    out: Path = args.out
    kept = json.loads(out.read_text())["points"] if out.exists() else []
    rows = [p for p in kept if (p["peers"], p["rounds"]) != (args.peers, args.rounds)] + [point]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "points": rows}, indent=1) + "\n")
    print(f"peers={point['peers']} rounds={point['rounds']} build_s={point['build_s']:.1f} "
          f"per_round_s={point['per_round_s']:.2f} consensus_s={point['consensus_s']:.1f} cpu_s={point['cpu_s']:.1f} "
          f"wall_s={point['wall_s']:.0f} load={point['load_average'][0]:.1f} "
          f"final_mean_accuracy={point['final_mean_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
