"""Aggregation cost: 10 updates of 10M parameters per strategy, against one stacked mean of the same tensors.

    python benchmarks/bench_aggregation.py            # 10 x 10M, 3 repeats
    python benchmarks/bench_aggregation.py --quick    # 10 x 1M, 5 repeats (< 30 s)

The baseline is ``torch.stack(flats).mean(0)`` (stacking included), measured in the same run on the same tensors
(best of the repeats for both);
each strategy's time includes its input screening (finite checks) as the node runs it. Targets: FedAvg within 2x,
Krum within 5x of the baseline. Writes JSON (default benchmarks/results/aggregation.json) with a ``headline``
(``fedavg_ratio``, ``krum_ratio`` and whether each meets its target, then every other strategy's ratio) and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quinkgl_cli.strategies import registry
from quinkgl_cli.strategies.aggregation import LABEL_ENTROPY_KEY
from quinkgl_cli.strategies.base import PeerUpdate

TARGETS = {"FedAvg": 2.0, "Krum": 5.0}


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Best of ``repeats`` after a warm-up: on a shared machine the minimum is the least disturbed run."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _target_cell(row: dict) -> str:  # type: ignore[type-arg]
    target = row["target_ratio"]
    if target is None:
        return "-"
    return f"<= {target:g}x " + ("ok" if row["ratio"] <= target else "MISSED")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M parameters, 5 repeats")
    ap.add_argument("--params", type=int, default=None, help="parameters per update (default 10M, 1M with --quick)")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/aggregation.json"))
    args = ap.parse_args()
    d = args.params or (1_000_000 if args.quick else 10_000_000)
    repeats = args.repeats or (5 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    center = torch.randn(d, generator=g)
    flats = [center + 0.01 * torch.randn(d, generator=g) for _ in range(args.updates)]
    local = PeerUpdate("p0", 5, flats[0], 100, meta={LABEL_ENTROPY_KEY: 3.0}, is_local=True)
    others = [PeerUpdate(f"p{i}", 5 - i % 3, f, 100 + i, meta={LABEL_ENTROPY_KEY: 1.0 + i / 10}) for i, f in enumerate(flats[1:], 1)]

    baseline = _time(lambda: torch.stack(flats).mean(0), repeats)
    rows = []
    print(f"{args.updates} updates x {d:,} params, torch threads={torch.get_num_threads()}, best of {repeats}")
    print(f"{'strategy':<26}{'seconds':>10}{'x baseline':>12}")
    print(f"{'stacked mean (baseline)':<26}{baseline:>10.4f}{1.0:>12.2f}")
    for name in registry.names("aggregation"):
        entry = registry.resolve("aggregation", name)
        agg = registry.load(entry)(registry.build_params(entry, {}), byzantine_f=2)
        seconds = _time(lambda agg=agg: agg.aggregate(local, others, 5), repeats)
        ratio = seconds / baseline
        target = TARGETS.get(name)
        mark = "" if target is None else (f"  ok (target <= {target:.0f}x)" if ratio <= target else f"  MISSED (target <= {target:.0f}x)")
        print(f"{name:<26}{seconds:>10.4f}{ratio:>12.2f}{mark}")
        rows.append({"strategy": name, "seconds": seconds, "ratio": ratio, "target_ratio": target})

    ratios = {r["strategy"]: r["ratio"] for r in rows}
    headline: dict[str, float] = {"fedavg_ratio": round(ratios["FedAvg"], 3), "krum_ratio": round(ratios["Krum"], 3)}
    headline.update({f"{name.lower()}_meets_target": int(ratios[name] <= target) for name, target in TARGETS.items()})
    headline.update({f"{name.lower()}_ratio": round(r, 3) for name, r in ratios.items() if name not in TARGETS})
    lines = [f"{args.updates} updates x {d:,} parameters, best of {repeats}, baseline: stacked mean {baseline:.4f} s", "",
             "| strategy | seconds | x stacked mean | target |", "|---|---:|---:|---:|"]
    lines += [f"| {r['strategy']} | {r['seconds']:.4f} | {r['ratio']:.2f} | "
              f"{_target_cell(r)} |"
              for r in rows]
    result = {
        "benchmark": "aggregation",
        "headline": headline,
        "updates": args.updates,
        "params": d,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "baseline_seconds": baseline,
        "strategies": rows,
        "markdown": "\n".join(lines),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
