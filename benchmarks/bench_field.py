"""Learning under field conditions: the digits swarm in the field driver (`quinkgl_cli.sim.field`), per strategy.

    python benchmarks/bench_field.py --size 20 [--seed 1]    # 20 peers x 20 rounds: 5 strategies x 5 conditions
    python benchmarks/bench_field.py --size 200               # 200 peers x 20 rounds: the defaults x 5 conditions
    python benchmarks/bench_field.py --size 200 --all-strategies   # ... and the four others too (5x longer)
    python benchmarks/bench_field.py --size 200 --strategies Scaffold,Median   # only these (names as in --aggregation)

Each size and seed is one invocation (4-30 minutes on this project's 2-core machine, by load); all go into one
file, a run's rows (size, seed, strategy, condition) replaced when it runs again, and the table averages over the
seeds run. Invocations may run at once: each merges its rows into the file under a lock.

Every run is the digits MLP on a non-IID split (``shards:2``: two label shards per peer), seed 0 by default, the manifest
defaults (RandomTopology, 4 local epochs, 1 gossip step, 6 final consensus steps) except the aggregation rule:
the defaults (FedAvg, with the default slow momentum), the gossip-SCAFFOLD aggregator, and three robust rules:
coordinate-wise Median (the manifest's byzantine_f 0: it needs no f), and TrimmedMean and MultiKrum with
byzantine_f 1 (at 0 they are plain means). With fanout 3 a peer averages its own model and about three others a
step, so MultiKrum, which needs 2f + 3 = 5 updates, mostly falls back to the Median, as it says in its
``aggregated models`` notes; TrimmedMean (3 needed) drops the extremes of each coordinate. Conditions, all
in virtual time with the daemon's round loop for every peer (rounds start every 10 virtual seconds, training takes
1 virtual second unless slowed):

- ideal: no latency, no loss, nobody leaves, equal speeds (the reference each row is compared with);
- churn 10% / 30%: that share of the online peers leaves in every round interval and returns two intervals later
  on average, from its last checkpoint;
- loss 10%: every model transfer and control message is lost with probability 0.1;
- stragglers 10x: 10% of the peers (drawn per peer) train ten times slower (10 s a round: a whole interval).

The 200-peer swarm runs, unless ``--all-strategies``, only the defaults (one 200-peer run takes 30-60 s on an idle
core); its rows compare with its own ideal row. Reported: the mean and worst peer's final accuracy (after the final consensus), and the
final mean's difference from the ideal row of the same strategy and size, in points; also the virtual seconds the
run took and the messages lost, departures and returns. Writes benchmarks/results/field.json after every run (a
partial file survives an interrupted run) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import time
from pathlib import Path
from typing import Any

from simkit import RESULTS, digits_manifest, digits_script, pct, quiet

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.sim.config import Overrides
from quinkgl_cli.sim.fieldconf import field_config
from quinkgl_cli.sim.simulator import SimConfig, simulate

SIZES = {20: 20, 200: 20}  # peers -> rounds
# label -> (aggregation, byzantine_f)
STRATEGIES = {"defaults (FedAvg)": ("FedAvg", 0), "Scaffold": ("Scaffold", 0), "Median (robust)": ("Median", 0),
              "TrimmedMean (robust, f=1)": ("TrimmedMean", 1), "MultiKrum (robust, f=1)": ("MultiKrum", 1)}
CONDITIONS: dict[str, dict[str, Any]] = {
    "ideal": {},
    "churn 10%": {"churn": 0.1},
    "churn 30%": {"churn": 0.3},
    "loss 10%": {"drop": 0.1},
    "stragglers 10x (10%)": {"speed": "straggler:1:0.1:10"},
}


def one(script: Any, peers: int, rounds: int, aggregation: str, byzantine_f: int, condition: dict[str, Any],
        seed: int) -> dict[str, Any]:
    manifest = digits_manifest(script, aggregation=aggregation)
    # The ideal row runs in the field driver too (a field flag at its default selects it): same loop, same rules.
    conditions = field_config(gossip_interval=10.0, **condition)
    started = time.perf_counter()
    result = simulate(script, manifest, SimConfig(peers=peers, rounds=rounds, partition="shards:2", seed=seed,
                                                  conditions=conditions, overrides=Overrides(byzantine_f=byzantine_f)))
    c = result.conditions
    return {
        "final_mean_accuracy": result.final.mean_accuracy, "final_min_accuracy": result.final.min_accuracy,
        "last_round_mean_accuracy": result.rounds[-1].mean_accuracy,
        "curve": [r.mean_accuracy for r in result.rounds],
        "virtual_s": result.timing["virtual_s"], "wall_s": time.perf_counter() - started,
        "messages_lost": c["messages_lost"], "messages_carried": c["messages_carried"],
        "departures": c["departures"], "returns_from_checkpoint": c["returns_from_checkpoint"],
        "returns_from_scratch": c["returns_from_scratch"],
        "stragglers": sum(1 for s in c["train_seconds"].values() if s > 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=sorted(SIZES), required=True, help="swarm size to run")
    parser.add_argument("--all-strategies", action="store_true", help="200 peers: every strategy, not the defaults only")
    parser.add_argument("--strategies", help="comma-separated aggregation names to run (default: per --size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and conditions")
    parser.add_argument("--out", type=Path, default=RESULTS / "field.json")
    args = parser.parse_args()
    quiet()
    script = digits_script()
    peers, rounds = args.size, SIZES[args.size]
    strategies = STRATEGIES if peers < 200 or args.all_strategies else {"defaults (FedAvg)": STRATEGIES["defaults (FedAvg)"]}
    if args.strategies:
        wanted = args.strategies.split(",")
        unknown = set(wanted) - {agg for agg, _ in STRATEGIES.values()}
        if unknown:
            parser.error(f"--strategies: unknown {', '.join(sorted(unknown))}")
        strategies = {label: spec for label, spec in STRATEGIES.items() if spec[0] in wanted}
    started = time.perf_counter()
    for label, (agg, f) in strategies.items():
        ideal: float | None = None
        for cond, flags in CONDITIONS.items():
            r = one(script, peers, rounds, agg, f, flags, args.seed)
            if cond == "ideal":
                ideal = r["final_mean_accuracy"]
            mean = r["final_mean_accuracy"]
            r.update(peers=peers, rounds=rounds, seed=args.seed, strategy=label, condition=cond, byzantine_f=f,
                     vs_ideal_points=None if mean is None or ideal is None else 100 * (mean - ideal))
            out = merge(args.out, r, f"{peers}/seed {args.seed}/{label}", time.perf_counter() - started)
            print(f"{peers} peers x {rounds} rounds, seed {args.seed} | {label} | {cond}: final {pct(mean)} "
                  f"(worst {pct(r['final_min_accuracy'])}) in {r['wall_s']:.1f} s", flush=True)
    print()
    print(table(out["runs"]))
    print(f"\n{peers} peers, seed {args.seed}: {time.perf_counter() - started:.0f} s; wrote {args.out}")


def merge(path: Path, run: dict[str, Any], total_key: str, total_s: float) -> dict[str, Any]:
    """Put ``run`` into the results file in place of an earlier run of the same key, under a lock: several
    invocations (sizes, seeds) may run at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ("peers", "seed", "strategy", "condition")
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out: dict[str, Any] = {"benchmark": "field", "partition": "shards:2", "gossip_interval_s": 10.0,
                               "runs": [], "total_s": {}}
        if path.exists():
            out = json.loads(path.read_text())
        out["runs"] = [r for r in out["runs"] if tuple(r.get(k) for k in key) != tuple(run[k] for k in key)]
        out["runs"].append(run)
        out["runs"].sort(key=lambda r: (r["peers"], r["seed"], list(STRATEGIES).index(r["strategy"]),
                                        list(CONDITIONS).index(r["condition"])))
        out["total_s"][total_key] = total_s
        out["python"] = platform.python_version()
        atomic_write_bytes(path, (json.dumps(out, indent=2) + "\n").encode())
    return out


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per size, strategy and condition; accuracies are means over the seeds run (their range in
    brackets when there are several), the difference from ideal is per seed, then averaged."""
    cells: dict[tuple[int, int, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["peers"], r["rounds"], r["strategy"], r["condition"]), []).append(r)
    lines = ["| peers x rounds | strategy | condition | seeds | final mean | worst peer | vs ideal (points) | lost / departures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (peers, rounds, strategy, cond), rs in cells.items():
        means = [r["final_mean_accuracy"] for r in rs if r["final_mean_accuracy"] is not None]
        worst = [r["final_min_accuracy"] for r in rs if r["final_min_accuracy"] is not None]
        deltas = [r["vs_ideal_points"] for r in rs if r["vs_ideal_points"] is not None]
        spread = f" ({pct(min(means))}-{pct(max(means))})" if len(means) > 1 else ""
        delta = "-" if not deltas or cond == "ideal" else f"{sum(deltas) / len(deltas):+.1f}"
        lost = sum(r["messages_lost"] for r in rs) // len(rs)
        gone = sum(r["departures"] for r in rs) // len(rs)
        lines.append(f"| {peers} x {rounds} | {strategy} | {cond} | {len(rs)} | {pct(_mean(means))}{spread} | "
                     f"{pct(_mean(worst))} | {delta} | {lost} / {gone} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    main()
