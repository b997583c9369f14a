"""Start-up cost of the light commands: median wall time of `quinkgl --help`, `keygen` and `manifest verify`.

Each run is a fresh process of the installed console script, as a user types it. Goal: under 0.25 s each.

    python benchmarks/bench_cli.py [--runs N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 0.25


def _quinkgl() -> list[str]:
    beside = Path(sys.executable).with_name("quinkgl")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("quinkgl")
    return [found] if found else [sys.executable, "-m", "quinkgl_cli"]


def _time(cmd: list[str], cwd: Path, env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (user + system of the child) of each run, after one warm-up run."""
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode().strip()}")
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 runs each")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cli.json")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    exe = _quinkgl()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, QUINKGL_HOME=str(work / "home"))
        # Installed packages run from cached bytecode; without it every edited module is recompiled at each start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([*exe, "keygen", "--output", "creator.key"], cwd=work, env=env, check=True, capture_output=True)
        pub = subprocess.run(
            [*exe, "keygen", "--show-public", "creator.key"], cwd=work, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(
            [*exe, "manifest", "create", "--name", "bench", "--task-type", "class", "--input-shape", "1,28,28",
             "--output-shape", "10", "--label-type", "integer", "--model-framework", "pytorch",
             "--model-arch-hash", "sha256:" + "ab" * 32, "--aggregation", "FedAvg", "--topology", "RandomTopology",
             "--sign-with", "creator.key", "--output", "bench.qgl"],
            cwd=work, env=env, check=True, capture_output=True,
        )  # fmt: skip

        cases = {
            "python_startup": _time([sys.executable, "-c", "pass"], work, env, runs),
            "help": _time([*exe, "--help"], work, env, runs),
            "keygen": _time([*exe, "keygen", "--output", "k.key", "--force"], work, env, runs),
            "manifest_verify": _time([*exe, "manifest", "verify", "bench.qgl", "--trusted-pubkey", pub], work, env, runs),
        }
    results = {
        name: {
            "median_s": round(statistics.median(walls), 4),
            "min_s": round(min(walls), 4),
            "median_cpu_s": round(statistics.median(cpus), 4),
            "min_cpu_s": round(min(cpus), 4),
            "runs": len(walls),
        }
        for name, (walls, cpus) in cases.items()
    }
    for name, r in results.items():
        mark = "" if name == "python_startup" else ("  ok" if r["median_s"] < GOAL_S else f"  OVER {GOAL_S}s goal")
        print(
            f"{name:16s} median {r['median_s'] * 1000:7.1f} ms  min {r['min_s'] * 1000:7.1f} ms  "
            f"cpu median {r['median_cpu_s'] * 1000:6.1f} min {r['min_cpu_s'] * 1000:6.1f} ms  ({r['runs']} runs){mark}"
        )
    # Start-up time is CPU-bound: on a shared machine compare medians only at similar load; min is the quiet-machine figure.
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"load average {load}")
    doc = {"goal_s": GOAL_S, "command": exe, "python": sys.version.split()[0], "cpus": os.cpu_count(), "loadavg": load, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
