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
"""

from __future__ import annotations

import argparse
import json
import re
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--partition", default="classes:3")
    p.add_argument("--interval", type=float, default=1.5)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "agreement.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep the daemons' logs here (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="qgl-agree-") as tmp:
        root = args.workdir or Path(tmp)
        manifest, _key, _pub, _swarm = ls.digits_manifest(root / "manifest", rounds=args.rounds)
        real = daemons(root, manifest, args.peers, args.rounds, args.interval, args.partition)
        sim = simulator(root, manifest, args.peers, args.rounds, args.partition)
    diff = compare(real, sim)
    summary = {"peers": args.peers, "rounds": args.rounds, "partition": args.partition, "interval": args.interval,
               "daemons": real, "simulator": sim, **diff, "daemon_exit_codes": real["exit_codes"]}
    print(f"max per-round difference {summary['max_round_diff_points']} points over {diff['rounds_compared']} rounds; "
          f"final {diff['final_diff_points']}; daemon exits {real['exit_codes']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
