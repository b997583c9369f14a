"""Run every benchmark of the project, collect their JSON into one file and print a markdown summary.

    python benchmarks/run_all.py            # full runs (minutes)
    python benchmarks/run_all.py --quick    # each script's --quick mode
    python benchmarks/run_all.py --only sim,tutorial   # replaces those entries in all.json, keeps the rest

Each benchmark is its own script (``bench_<name>.py``) run in a fresh process with ``--json PATH`` (and ``--quick``);
a script that does not exist yet is skipped and listed as such, one that fails is reported with its exit code and
the last lines of its output, and the others still run. Results go to benchmarks/results/all.json (quick:
benchmarks/results/quick/all.json), each script's own JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# (name, what it measures, owner's headline keys to surface in the summary)
BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("cli", "CLI start-up: --help, keygen, manifest verify"),
    ("transfer", "model transfer between daemons vs raw TCP"),
    ("seal", "sealing every datagram: per-datagram cost vs the signature check, control messages/s sealed vs clear"),
    ("aggregation", "aggregation per strategy vs one stacked mean"),
    ("compression", "encode/decode vs a memory copy, bytes on the wire, accuracy under compression (simulator)"),
    ("choco", "CHOCO compressed gossip vs uncompressed gossip: accuracy and megabytes (simulator)"),
    ("daemon", "daemon start-up, RSS and per-round overhead"),
    ("sim", "simulator scale and the learning table"),
    ("tutorial", "gossip vs FedAvg under local DP (the tutorial's experiment)"),
    ("personal", "personalized models: APFL and FedRep vs local-only and the shared model"),
    ("byzantine", "the defaults against 10% Byzantine peers (sign flip, noise, scale), four model families (simulator)"),
)
TAIL_LINES = 15


def _headline(data: Any) -> list[tuple[str, Any]]:
    """The numbers a result puts under ``headline``, else its top-level numbers, for a compact summary cell."""
    if not isinstance(data, dict):
        return []
    source = data.get("headline") if isinstance(data.get("headline"), dict) else data
    return [(k, v) for k, v in source.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seconds", "quick")]


def run_one(name: str, quick: bool, out_dir: Path, timeout: float) -> dict[str, Any]:
    script = HERE / f"bench_{name}.py"
    json_path = out_dir / f"{name}.json"
    if not script.is_file():
        return {"name": name, "status": "skipped", "reason": f"{script.name} does not exist yet"}
    cmd = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))}
    started = time.perf_counter()
    if json_path.exists():
        json_path.unlink()  # a stale file from an earlier run must not pass for this run's result
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "failed", "reason": f"timed out after {timeout:.0f} s",
                "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    entry: dict[str, Any] = {"name": name, "command": " ".join(cmd[1:]), "seconds": seconds, "exit_code": proc.returncode}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-TAIL_LINES:]
        return {**entry, "status": "failed", "reason": f"exit code {proc.returncode}", "output_tail": tail}
    try:
        entry["result"] = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        return {**entry, "status": "failed", "reason": f"no readable JSON at {json_path}: {exc}"}
    entry["status"] = "ok"
    entry["stdout_tail"] = proc.stdout.strip().splitlines()[-TAIL_LINES:]
    return entry


def merged(all_path: Path, fresh: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """A partial run (``--only``) replaces its own entries in an existing all.json and keeps the others."""
    try:
        previous = json.loads(all_path.read_text()).get("benchmarks", [])
    except (OSError, ValueError, AttributeError):
        previous = []
    by_name = {e.get("name"): e for e in previous if isinstance(e, dict)}
    by_name.update({e["name"]: e for e in fresh})
    return [by_name[n] for n in order if n in by_name]


def summary(entries: list[dict[str, Any]]) -> str:
    what = dict(BENCHMARKS)
    lines = ["| benchmark | measures | status | seconds | headline numbers |", "|---|---|---|---:|---|"]
    for e in entries:
        status = e["status"] if e["status"] == "ok" else f"{e['status']}: {e['reason']}"
        numbers = ""
        if e["status"] == "ok":
            nums = _headline(e["result"])[:8]
            numbers = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in nums)
        secs = f"{e['seconds']:.1f}" if "seconds" in e else "-"
        lines.append(f"| {e['name']} | {what.get(e['name'], '')} | {status} | {secs} | {numbers} |")
    tables = [f"\n### {e['name']}\n\n{e['result']['markdown']}" for e in entries
              if e["status"] == "ok" and isinstance(e["result"].get("markdown"), str)]
    return "\n".join(lines) + ("\n" + "\n".join(tables) if tables else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="run each benchmark's --quick mode")
    ap.add_argument("--only", default=None, help="comma-separated subset, e.g. sim,tutorial")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/all.json (quick: results/quick/all.json)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 120 quick, 1800 full)")
    args = ap.parse_args()
    names = [n for n, _ in BENCHMARKS]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (120.0 if args.quick else 1800.0)
    entries = []
    for name in names:
        print(f"running {name} ...", flush=True)
        entry = run_one(name, args.quick, out_dir, timeout)
        print(f"  {entry['status']}" + (f": {entry['reason']}" if entry["status"] != "ok" else f" in {entry['seconds']:.1f} s"),
              flush=True)
        for line in entry.get("output_tail", []):
            print(f"    {line}", flush=True)
        entries.append(entry)
    all_path = args.json or out_dir / "all.json"
    if args.only:
        entries = merged(all_path, entries, [n for n, _ in BENCHMARKS])
    table = summary(entries)
    print()
    print(table)
    all_path.write_text(json.dumps({"quick": args.quick, "benchmarks": entries, "markdown": table}, indent=2) + "\n")
    print(f"\nwrote {all_path}")
    if any(e["status"] == "failed" for e in entries):
        sys.exit(1)


if __name__ == "__main__":
    main()
