"""Simulator scale, local against worker processes and Ray: wall time, CPU time and peak memory for N peers x R rounds of the digits MLP.

    python benchmarks/bench_scale.py                                  # 100 / 1,000 / 10,000 peers x 20 rounds
    python benchmarks/bench_scale.py --sizes 100,1000 --backends local
    python benchmarks/bench_scale.py --one ray 1000 20               # one point, JSON on stdout (what the above runs)
    python benchmarks/bench_scale.py --sizes 1000 --backends local,processes

Every point runs in a fresh process (the earlier points' memory would otherwise count), with the default manifest
(``min_local_steps=0`` set explicitly: ``local_epochs`` passes a round, the work of every point so far) on an IID
split, seed 1, the simulator's defaults (peer views of at most 256). Digits has 1,438 training samples:
beyond that many peers the training set is repeated 7 times (`scripts/digits_tiled.py`, the same MLP), so every
peer holds one; each point records its ``data``. The Ray backend starts a private
Ray on 127.0.0.1 with one actor per CPU; the processes backend runs one worker process per CPU. Measured for the whole process tree (the driver and, for Ray, every Ray
process: GCS, raylet, workers), sampled every 0.5 s from /proc: the peak resident memory of the tree and the CPU
seconds it used (user + system), the workers' included. Wall time is what a user waits; on a shared, loaded machine it mostly measures
the other tenants, so CPU seconds are reported beside it (on an idle 2-core machine the local backend's wall time is
about its CPU time, Ray's about its CPU time / 2). ``ray_overhead`` is Ray's CPU seconds / local's for the same
point (``overhead_cpu`` and ``speedup_wall`` for either backend against local); ``curve_max_diff`` is the largest
difference between the two backends' per-round mean accuracies (aim: 0, identical curves), with ``identical`` saying whether every peer's metrics agree exactly. Points not measured here
(``--skip``, or a deadline) are left out, never estimated: the README labels extrapolations as such.
Writes benchmarks/results/scale.json (merged with what it holds for other points) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from simkit import RESULTS, digits_manifest, digits_script, quiet

from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.simulator import SimConfig, Simulator

OUT = RESULTS / "scale.json"
TILED = Path(__file__).resolve().parent / "scripts" / "digits_tiled.py"
DIGITS_TRAIN = 1438  # digits' training samples: beyond this many peers, some would hold none
TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class TreeMeter:
    """Peak resident memory of this process and its descendants, and the CPU seconds each used (last seen)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        total = 0.0
        for pid in _tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/statm") as fh:
                    total += int(fh.read().split()[1]) * PAGE_MB
            except (OSError, ValueError, IndexError):
                continue
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        self.peak_mb = max(self.peak_mb, total)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> TreeMeter:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def one(backend: str, peers: int, rounds: int, repeat: int) -> dict[str, Any]:
    quiet()
    script = digits_script() if repeat == 1 else load_script(TILED)
    manifest = digits_manifest(script, training={"min_local_steps": 0})
    config = SimConfig(peers=peers, rounds=rounds, partition="iid", seed=1,
                       script_args={"repeat": str(repeat)} if repeat > 1 else {})
    code = _commit()  # at the start: a checkout may move on while a long point runs
    started = time.perf_counter()
    with TreeMeter() as meter:

        def progress(summary: Any) -> None:  # on stderr, so that a point cut short still tells how far it got
            print(f"{backend} peers={peers} {summary.phase} round={summary.round} seconds={summary.seconds:.1f} "
                  f"wall_s={time.perf_counter() - started:.0f} cpu_s={meter.cpu_s:.0f} tree_mb={meter.peak_mb:.0f} "
                  f"mean_accuracy={summary.mean_accuracy:.3f}", file=sys.stderr, flush=True)

        sim = Simulator(script, manifest, config, progress)
        if backend == "ray":
            from quinkgl_cli.sim.raybackend import RaySimulation

            result = RaySimulation(sim, progress=progress).run()
            meter.sample()  # the actors are gone; Ray's own processes stop with the interpreter
        elif backend == "processes":
            from quinkgl_cli.sim.procbackend import ProcessSimulation

            result = ProcessSimulation(sim, progress=progress).run()
            meter.sample()
        else:
            result = sim.run()
            meter.sample()
    return {
        "backend": backend, "peers": peers, "rounds": rounds, "data": "digits" if repeat == 1 else f"digits x{repeat}",
        "code": code,
        "wall_s": time.perf_counter() - started, "build_s": result.timing["build_s"], "run_s": result.timing["run_s"],
        "cpu_s": meter.cpu_s, "peak_mb": meter.peak_mb, "peak_mb_per_peer": meter.peak_mb / peers,
        "shards": result.memory.get("shards", 1.0),
        "known_peers_mean": result.memory["known_peers_mean"],
        "curve": [r.mean_accuracy for r in result.rounds],
        "final_mean_accuracy": result.final.mean_accuracy,
        "peers_metrics": [[p.val_accuracy, p.val_loss, p.bytes_sent] for p in result.rounds[-1].peers],
    }


def _commit() -> str | None:
    """The checkout's commit: points are compared only with points of the same code."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parent)
    return done.stdout.strip() if done.returncode == 0 else None


def repeat_for(peers: int) -> int:
    return 1 if peers <= DIGITS_TRAIN else 7


def measure(backend: str, peers: int, rounds: int, repeat: int, timeout: float | None) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--one", backend, str(peers), str(rounds), "--repeat", str(repeat)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{backend} {peers} peers: not finished within {timeout:.0f} s; left out", flush=True)
        return None
    if proc.returncode != 0:
        raise SystemExit(f"{backend} with {peers} peers failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    entry: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{backend} peers={peers} rounds={rounds} wall_s={entry['wall_s']:.1f} cpu_s={entry['cpu_s']:.1f} "
          f"peak_mb={entry['peak_mb']:.0f} final={entry['final_mean_accuracy']:.3f}", flush=True)
    return entry


def compare(points: list[dict[str, Any]]) -> None:
    """Each sharded backend's overhead, wall-time speed-up and curve difference against local, on each point
    measured with both."""
    by = {(p["backend"], p["peers"], p["rounds"]): p for p in points}
    for p in points:
        local = by.get(("local", p["peers"], p["rounds"]))
        if p["backend"] == "local" or local is None or p.get("code") is None or p.get("code") != local.get("code"):
            continue  # another code's curve may differ for reasons of its own: what was compared then is kept
        p["overhead_cpu"] = p["cpu_s"] / local["cpu_s"]
        p["speedup_wall"] = local["wall_s"] / p["wall_s"]
        if p["backend"] == "ray":
            p["ray_overhead_cpu"] = p["overhead_cpu"]
            p["ray_overhead_wall"] = p["wall_s"] / local["wall_s"]
        p["curve_max_diff"] = max(abs(a - b) for a, b in zip(p["curve"], local["curve"], strict=True))
        p["identical"] = p["curve"] == local["curve"] and p["peers_metrics"] == local["peers_metrics"]


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| peers x rounds | backend | wall s | CPU s | peak MB (MB/peer) | CPU / local's | curve diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(points, key=lambda p: (p["peers"], p["rounds"], p["backend"])):
        over = f"{p['overhead_cpu']:.2f}x" if "overhead_cpu" in p else "-"
        diff = ("identical" if p["identical"] else f"{p['curve_max_diff']:.4f}") if "identical" in p else "-"
        lines.append(f"| {p['peers']:,} x {p['rounds']} | {p['backend']} | {p['wall_s']:.0f} | {p['cpu_s']:.0f} | "
                     f"{p['peak_mb']:.0f} ({p['peak_mb_per_peer']:.2f}) | {over} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--backends", default="local,ray")
    ap.add_argument("--timeout", type=float, default=None, help="seconds one point may take before it is left out")
    ap.add_argument("--one", nargs=3, metavar=("BACKEND", "PEERS", "ROUNDS"))
    ap.add_argument("--repeat", type=int, default=None,
                    help="repeat digits' training set this many times (default: 1, or 7 above 1,400 peers: each "
                         "peer needs a sample)")
    args = ap.parse_args()
    if args.one:
        backend, peers, rounds = args.one
        print(json.dumps(one(backend, int(peers), int(rounds), args.repeat or repeat_for(int(peers)))))
        return
    kept = json.loads(OUT.read_text())["points"] if OUT.exists() else []
    points = {(p["backend"], p["peers"], p["rounds"]): p for p in kept}
    for peers in (int(s) for s in args.sizes.split(",")):
        for backend in args.backends.split(","):
            entry = measure(backend, peers, args.rounds, args.repeat or repeat_for(peers), args.timeout)
            if entry is not None:
                points[(backend, peers, args.rounds)] = entry
                rows = list(points.values())
                compare(rows)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "points": rows}, indent=1) + "\n")
    rows = list(points.values())
    compare(rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
