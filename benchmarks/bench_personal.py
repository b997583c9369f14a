"""Personalized models (issue 14): accuracy on each peer's own label distribution and on the global validation set,
for local-only training, the shared gossip model (personalization none), APFL and FedRep.

    python benchmarks/bench_personal.py --split dirichlet:0.3            # seeds 7, 1, 2; 20 rounds
    python benchmarks/bench_personal.py --split shards:2 --seeds 7       # one seed

20 peers on scikit-learn's digits (the bundled script: MLP 64-32-10, SGD momentum 0.9), the swarm defaults
otherwise (FedAvg, random fanout 3, 4 local epochs, 6 averaging-only exchanges after the last round). Per run:
``own``: each peer's personal model on its own label distribution (`quinkgl_cli.node.owneval`), mean and worst
peer, after the last training round and after the final merge; ``global``: the served shared model on the validation
set (FedRep: the served backbone under each peer's own head; local: each peer's own model); APFL's personal model on
the validation set and its learned alphas; model bytes sent per peer per training round. Each split writes
``benchmarks/results/personal_<split>.json`` and a PNG of the own-distribution curves, and prints a markdown table.
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

from simkit import RESULTS, digits_manifest, digits_script, pct, quiet  # noqa: E402

from quinkgl_cli.atomic import atomic_write_bytes  # noqa: E402
from quinkgl_cli.sim.report import Curve, communication, plot_panels  # noqa: E402
from quinkgl_cli.sim.simulator import Overrides, SimConfig, SimResult, Simulator  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="dirichlet:0.3")
    ap.add_argument("--seeds", default="7,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    quiet()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, (mode, personalization) in VARIANTS.items():
        for seed in seeds:
            r = one(mode, personalization, args.split, seed, args.rounds)
            runs.setdefault(name, []).append({"seed": seed, **r})
            print(f"{args.split} {name} seed={seed} own={pct(r['own_final'])} (worst {pct(r['own_final_worst'])}) "
                  f"global={pct(r['global_final'])} {r['seconds']:.0f}s", flush=True)
    summary = {name: {k: mean([r[k] for r in rs]) for k in ("own_last", "own_final", "global_last", "global_final",
                                                             "personal_global_final", "alpha_mean",
                                                             "bytes_per_peer_per_round", "mb_sent")}
               | {"own_final_worst": min(r["own_final_worst"] for r in rs),
                  "own_last_worst": min(r["own_last_worst"] for r in rs)}
               for name, rs in runs.items()}
    print(f"\n20 peers, digits, {args.split}, {args.rounds} rounds, seeds {args.seeds} (mean; worst: lowest over seeds)\n")
    print("| training | own distribution: after last round (worst peer) | after final merge (worst peer) | "
          "validation set, shared model | bytes / peer / round |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        extra = f" (APFL personal model: {pct(s['personal_global_final'])})" if s["personal_global_final"] else ""
        print(f"| {name} | {pct(s['own_last'])} ({pct(s['own_last_worst'])}) | {pct(s['own_final'])} "
              f"({pct(s['own_final_worst'])}) | {pct(s['global_final'])}{extra} | {s['bytes_per_peer_per_round']:,.0f} |")
    tag = args.split.replace(":", "")
    out = {"split": args.split, "peers": 20, "rounds": args.rounds, "seeds": seeds, "summary": summary, "runs": runs}
    atomic_write_bytes(RESULTS / f"personal_{tag}.json", (json.dumps(out, indent=2) + "\n").encode())
    rounds = list(range(1, args.rounds + 1))
    curves = [Curve(name, rounds, [mean([r["own_curve"][i] for r in rs]) for i in range(args.rounds)],
                    final=summary[name]["own_final"] if name != "local only" else None) for name, rs in runs.items()]
    plot_panels([(f"personal model, own label distribution ({args.split}, 20 peers, mean of {len(seeds)} seeds)",
                  curves)], RESULTS / f"personal_{tag}.png", ylabel="accuracy on own label distribution")
    print(f"\nwrote {RESULTS / f'personal_{tag}.json'} and personal_{tag}.png")


if __name__ == "__main__":
    main()
