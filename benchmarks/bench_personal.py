"""Personalized models (issue 14): accuracy on each peer's own label distribution and on the global validation set,
for local-only training, the shared gossip model (personalization none), APFL and FedRep.

    python benchmarks/bench_personal.py                 # dirichlet:0.3 and shards:2, seeds 7, 1, 2, 20 rounds
    python benchmarks/bench_personal.py --quick         # one seed, 8 rounds

20 peers on scikit-learn's digits (the bundled script: MLP 64-32-10, SGD momentum 0.9), the swarm defaults
otherwise (FedAvg, random fanout 3, 4 local epochs, 6 averaging-only exchanges after the last round). Per run:
``own``: each peer's personal model on its own label distribution (`quinkgl_cli.node.owneval`), mean and worst
peer, after the last training round and after the final merge; ``global``: the served shared model on the validation
set (FedRep: the served backbone under each peer's own head; local: each peer's own model); APFL's personal model on
the validation set and its learned alphas; model bytes sent per peer per training round. Writes ``benchmarks/results/personal.json`` (``--json``) and, beside
it, a PNG of the own-distribution curves; prints a markdown table per split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simkit import RESULTS, digits_manifest, digits_script, pct, quiet

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.sim.report import Curve, communication, plot_panels
from quinkgl_cli.sim.simulator import Overrides, SimConfig, SimResult, Simulator

VARIANTS = {  # name: (simulator mode, personalization)
    "local only": ("local", "none"),
    "shared (none)": ("gossip", "none"),
    "APFL": ("gossip", "apfl"),
    "FedRep": ("gossip", "fedrep"),
}


def one(mode: str, personalization: str, split: str, seed: int, rounds: int) -> dict[str, Any]:
    script = digits_script()
    cfg = SimConfig(peers=20, rounds=rounds, partition=split, seed=seed, mode=mode,  # type: ignore[arg-type]
                    overrides=Overrides(personalization=personalization))
    started = time.perf_counter()
    result: SimResult = Simulator(script, digits_manifest(script), cfg).run()
    last, final = result.rounds[-1], result.final
    comm = communication(result)
    alphas = [p.alpha for p in final.peers if p.alpha is not None]
    return {
        "own_last": last.mean_own_accuracy, "own_last_worst": last.min_own_accuracy,
        "own_final": final.mean_own_accuracy, "own_final_worst": final.min_own_accuracy,
        "global_last": last.mean_accuracy, "global_final": final.mean_accuracy,
        "personal_global_final": final.mean_personal_val_accuracy,
        "alpha_mean": statistics.mean(alphas) if alphas else None,
        "alpha_range": [min(alphas), max(alphas)] if alphas else None,
        "own_curve": [r.mean_own_accuracy for r in result.rounds],
        "global_curve": [r.mean_accuracy for r in result.rounds],
        "bytes_per_peer_per_round": comm["training_bytes"] / (20 * len(result.rounds)),
        "mb_sent": comm["bytes_sent_total"] / 1e6,
        "seconds": time.perf_counter() - started,
    }


def mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.mean(xs) if xs else None


def split_table(split: str, seeds: list[int], rounds: int) -> tuple[dict[str, Any], str, list[Curve]]:
    """Every variant on one split: (summary and runs, its markdown table, own-distribution curves)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, (mode, personalization) in VARIANTS.items():
        for seed in seeds:
            r = one(mode, personalization, split, seed, rounds)
            runs.setdefault(name, []).append({"seed": seed, **r})
            print(f"{split} {name} seed={seed} own={pct(r['own_final'])} (worst {pct(r['own_final_worst'])}) "
                  f"global={pct(r['global_final'])} {r['seconds']:.0f}s", flush=True)
    keys = ("own_last", "own_final", "global_last", "global_final", "personal_global_final", "alpha_mean",
            "bytes_per_peer_per_round", "mb_sent")
    summary = {name: {k: mean([r[k] for r in rs]) for k in keys}
               | {"own_final_worst": min(r["own_final_worst"] for r in rs),
                  "own_last_worst": min(r["own_last_worst"] for r in rs)}
               for name, rs in runs.items()}
    lines = [f"20 peers, digits, {split}, {rounds} rounds, seeds {', '.join(map(str, seeds))} "
             "(mean; worst peer: the lowest over seeds)", "",
             "| training | own distribution, after the last round (worst peer) | after the final merge (worst peer) | "
             "validation set | bytes / peer / round |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        extra = f" (personal model {pct(s['personal_global_final'])})" if s["personal_global_final"] else ""
        lines.append(f"| {name} | {pct(s['own_last'])} ({pct(s['own_last_worst'])}) | {pct(s['own_final'])} "
                     f"({pct(s['own_final_worst'])}) | {pct(s['global_final'])}{extra} | "
                     f"{s['bytes_per_peer_per_round']:,.0f} |")
    xs = list(range(1, rounds + 1))
    curves = [Curve(name, xs, [mean([r["own_curve"][i] for r in rs]) for i in range(rounds)],
                    final=summary[name]["own_final"] if VARIANTS[name][0] == "gossip" else None)
              for name, rs in runs.items()]
    return {"summary": summary, "runs": runs}, "\n".join(lines), curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="dirichlet:0.3,shards:2")
    ap.add_argument("--seeds", default="7,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="one seed, 8 rounds")
    ap.add_argument("--json", type=Path, default=RESULTS / "personal.json")
    args = ap.parse_args()
    quiet()
    seeds = [7] if args.quick else [int(s) for s in args.seeds.split(",")]
    rounds = 8 if args.quick else args.rounds
    started = time.perf_counter()
    results: dict[str, Any] = {}
    tables: list[str] = []
    panels: list[tuple[str, list[Curve]]] = []
    for split in args.splits.split(","):
        data, table, curves = split_table(split, seeds, rounds)
        results[split] = data
        tables.append(table)
        panels.append((f"{split}: personal model on its peer's own label distribution", curves))
        print("\n" + table + "\n", flush=True)
    headline = {f"{split}_{key}_{name.split()[0].lower()}": results[split]["summary"][name][metric]
                for split in results for name in VARIANTS for key, metric in (("own", "own_final"),)}
    out = {"peers": 20, "rounds": rounds, "seeds": seeds, "splits": results, "headline": headline,
           "markdown": "\n\n".join(tables), "seconds": time.perf_counter() - started, "quick": args.quick}
    atomic_write_bytes(args.json, (json.dumps(out, indent=2) + "\n").encode())
    png = args.json.with_suffix(".png")
    plot_panels(panels, png, ylabel="accuracy on own label distribution")
    print(f"wrote {args.json} and {png}")


if __name__ == "__main__":
    main()
