"""Learning under field conditions: the digits swarm in the field driver (`quinkgl_cli.sim.field`), per strategy.

    python benchmarks/bench_field.py --size 20 [--seed 1]    # 20 peers x 20 rounds: 3 strategies x 5 conditions
    python benchmarks/bench_field.py --size 200               # 200 peers x 6 rounds: the defaults x 5 conditions
    python benchmarks/bench_field.py --size 200 --all-strategies   # ... and Scaffold and Median too (3x longer)

Each size and seed is one invocation (5-15 minutes on this project's loaded 2-core machine); all go into one
file, a size and seed's rows replaced when it runs again, and the table averages over the seeds run.

Every run is the digits MLP on a non-IID split (``shards:2``: two label shards per peer), seed 0 by default, the manifest
defaults (RandomTopology, 4 local epochs, 1 gossip step, 6 final consensus steps) except the aggregation rule:
the defaults (FedAvg), the gossip-SCAFFOLD aggregator, and a robust rule (coordinate-wise Median). Conditions, all
in virtual time with the daemon's round loop for every peer (rounds start every 10 virtual seconds, training takes
1 virtual second unless slowed):

- ideal: no latency, no loss, nobody leaves, equal speeds (the reference each row is compared with);
- churn 10% / 30%: that share of the online peers leaves in every round interval and returns two intervals later
  on average, from its last checkpoint;
- loss 10%: every model transfer and control message is lost with probability 0.1;
- stragglers 10x: 10% of the peers (drawn per peer) train ten times slower (10 s a round: a whole interval).

The 200-peer swarm runs 6 rounds (not 20) and, unless ``--all-strategies``, only the defaults, to stay within the
time the machine gives a benchmark (one 200-peer run takes about two minutes there); its rows compare with its own
ideal row. Reported: the mean and worst peer's final accuracy (after the final consensus), and the
final mean's difference from the ideal row of the same strategy and size, in points; also the virtual seconds the
run took and the messages lost, departures and returns. Writes benchmarks/results/field.json after every run (a
partial file survives an interrupted run) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from simkit import RESULTS, digits_manifest, digits_script, pct, quiet

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.sim.fieldconf import field_config
from quinkgl_cli.sim.simulator import SimConfig, simulate

SIZES = {20: 20, 200: 6}  # peers -> rounds
STRATEGIES = {"defaults (FedAvg)": "FedAvg", "Scaffold": "Scaffold", "Median (robust)": "Median"}
CONDITIONS: dict[str, dict[str, Any]] = {
    "ideal": {},
    "churn 10%": {"churn": 0.1},
    "churn 30%": {"churn": 0.3},
    "loss 10%": {"drop": 0.1},
    "stragglers 10x (10%)": {"speed": "straggler:1:0.1:10"},
}


def one(script: Any, peers: int, rounds: int, aggregation: str, condition: dict[str, Any], seed: int) -> dict[str, Any]:
    manifest = digits_manifest(script, aggregation=aggregation)
    # The ideal row runs in the field driver too (a field flag at its default selects it): same loop, same rules.
    conditions = field_config(gossip_interval=10.0, **condition)
    started = time.perf_counter()
    result = simulate(script, manifest, SimConfig(peers=peers, rounds=rounds, partition="shards:2", seed=seed,
                                                  conditions=conditions))
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
    parser.add_argument("--all-strategies", action="store_true", help="200 peers: Scaffold and Median too")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and conditions")
    parser.add_argument("--out", type=Path, default=RESULTS / "field.json")
    args = parser.parse_args()
    quiet()
    script = digits_script()
    peers, rounds = args.size, SIZES[args.size]
    out: dict[str, Any] = {"benchmark": "field", "partition": "shards:2", "gossip_interval_s": 10.0,
                           "runs": [], "total_s": {}}
    if args.out.exists():
        out = json.loads(args.out.read_text())
        out["runs"] = [r for r in out["runs"] if (r["peers"], r.get("seed", 0)) != (peers, args.seed)]
    out["python"] = platform.python_version()
    strategies = STRATEGIES if peers < 200 or args.all_strategies else {"defaults (FedAvg)": "FedAvg"}
    started = time.perf_counter()
    for label, agg in strategies.items():
        ideal: float | None = None
        for cond, flags in CONDITIONS.items():
            r = one(script, peers, rounds, agg, flags, args.seed)
            if cond == "ideal":
                ideal = r["final_mean_accuracy"]
            mean = r["final_mean_accuracy"]
            r.update(peers=peers, rounds=rounds, seed=args.seed, strategy=label, condition=cond,
                     vs_ideal_points=None if mean is None or ideal is None else 100 * (mean - ideal))
            out["runs"].append(r)
            out["total_s"][f"{peers}/seed {args.seed}"] = time.perf_counter() - started
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(args.out, (json.dumps(out, indent=2) + "\n").encode())
            print(f"{peers} peers x {rounds} rounds, seed {args.seed} | {label} | {cond}: final {pct(mean)} "
                  f"(worst {pct(r['final_min_accuracy'])}) in {r['wall_s']:.1f} s", flush=True)
    print()
    print(table(out["runs"]))
    print(f"\n{peers} peers, seed {args.seed}: {out['total_s'][f'{peers}/seed {args.seed}']:.0f} s; wrote {args.out}")


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
