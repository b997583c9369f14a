"""The gossip-vs-FedAvg differential-privacy experiment of the tutorial (reference/gossip-dp-tutorial.txt), on digits.

    python benchmarks/bench_tutorial.py            # epsilon in {inf, 8, 4, 2, 1}, 20 rounds, 4 methods + trade-off sweep
    python benchmarks/bench_tutorial.py --quick    # epsilon in {inf, 1}, 8 rounds, 2 methods, 1 trade-off point (< 30 s)

The tutorial's protocol, with our components (real nodes over the memory transport, the node's own local-DP stage):
20 peers with 2 label shards each, one local epoch, SGD lr 0.06 momentum 0.9, and on every shared update clipping
to L2 norm 2.0 plus Gaussian noise sigma = clip * sqrt(2 ln(1.25/delta)) / epsilon per coordinate (delta 1e-5),
applied by each peer to its model at the end of local training, as the tutorial's clients do.

Methods (series):
- ``fedavg``: centralized FedAvg, the simulator's baseline mode: one aggregator node samples 10 of the 20 clients per
  round, broadcasts the global model, averages their noised uploads;
- ``ring``: the tutorial's gossip, the simulator's ``pairwise`` mode: after every peer trained, 10 edges of the ring
  (RingTopology, fanout 2) drawn uniformly with replacement are averaged one after another, both ends sending their
  model to each other and setting it to the pair's mean;
- ``ring_push`` (full run): what the daemon's gossip does on the same ring: every peer pushes its model to both ring
  neighbours once a round and averages what it got (twice the tutorial's sends);
- ``defaults`` (full run): gossip with the quinkgl manifest defaults (random fanout 3, default epochs, final consensus).

Deviations from the tutorial, also listed in the JSON (``deviations``):
- digits (1,437 training images of 8x8, MLP 64-32-10) instead of MNIST (60,000 of 28x28, MLP 784-256-128-10);
- batch 16 instead of 64: a digits peer holds ~72 samples where a tutorial client held 3,000 images, and batch 64
  would leave one or two optimizer steps per round and measure nothing but under-training;
- averaging is sample-weighted (FedAvg), the tutorial's is a plain mean: the shards differ by at most one sample in
  36, so the weights differ by under 3%;
- epsilon = inf runs with epsilon 1e9 (noise sigma ~1e-8, none to speak of): the tutorial still clips updates to 2.0
  without DP, and our DP stage clips only when an epsilon is set.

Reported as in the tutorial: accuracy curves, final accuracy against epsilon, and rounds to 90% of the best final
accuracy of the same method without DP (tutorial_curves.png, tutorial_final_vs_epsilon.png, tutorial_rounds_to_90.png,
tutorial_table.md). With the tutorial's clip 2.0 the noise of every finite epsilon in its sweep is huge for a
2,410-parameter model (sigma 1.2 per coordinate at epsilon 8, a noise norm of ~60 against a clip of 2), so all of them
end near chance. A separate trade-off sweep (``tradeoff`` in the JSON, tutorial_tradeoff.md and .png) runs the same
setting at epsilon 16, 32, 64 and 256 (quick: 64), where the noise norm (30, 15, 7.4, 1.9) comes down to the clip
norm, to show where the privacy/utility trade-off of this model actually lives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from simkit import RESULTS, digits_manifest, digits_script, pct, quiet

from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.sim.report import Curve, curve_of, plot_panels, plot_xy
from quinkgl_cli.sim.simulator import SimConfig, SimResult, simulate

PEERS = 20
CLIP = 2.0
DELTA = 1e-5
CLIP_ONLY_EPSILON = 1e9  # "no DP" as the tutorial runs it: clipped, not noised
PAIRS_PER_ROUND = 10
SCRIPT_ARGS = {"lr": "0.06", "batch_size": "16"}
TUTORIAL = {"local_epochs": 1, "gossip_steps": 1, "final_consensus_steps": 0}
METHODS = {
    "fedavg": "centralized FedAvg (10 of 20)",
    "ring": "gossip on a ring (tutorial: 10 pairs/round)",
    "ring_push": "ring push to both neighbours",
    "defaults": "gossip, quinkgl defaults",
}
DEVIATIONS = [
    "digits (1,437 8x8 training images, MLP 64-32-10) instead of MNIST (60,000 28x28, MLP 784-256-128-10)",
    "batch 16 instead of 64 (a peer holds ~72 samples; batch 64 would leave 1-2 optimizer steps per round)",
    "sample-weighted averaging (FedAvg) instead of a plain mean: shard sizes differ by at most 1 in 36",
    f"epsilon inf runs as epsilon {CLIP_ONLY_EPSILON:g} (sigma ~1e-8) so that updates are clipped to {CLIP} as in the "
    "tutorial; our DP stage clips only when an epsilon is set",
]


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def sigma(eps: float) -> float:
    return 0.0 if math.isinf(eps) else CLIP * math.sqrt(2.0 * math.log(1.25 / DELTA)) / eps


def rounds_to_threshold(curve: list[float | None], threshold: float) -> int | None:
    for i, acc in enumerate(curve):
        if acc is not None and acc >= threshold:
            return i + 1
    return None


def run(script: PeerScript, method: str, eps: float, rounds: int, seed: int) -> SimResult:
    privacy: dict[str, Any] = {"dp_epsilon": CLIP_ONLY_EPSILON if math.isinf(eps) else eps, "dp_clip_norm": CLIP,
                               "dp_delta": DELTA}
    base = {"peers": PEERS, "rounds": rounds, "partition": "shards:2", "seed": seed, "script_args": SCRIPT_ARGS}
    if method == "fedavg":
        manifest = digits_manifest(script, training=TUTORIAL, privacy=privacy)
        cfg = SimConfig(mode="fedavg", clients_per_round=10, **base)  # type: ignore[arg-type]
    elif method in ("ring", "ring_push"):
        manifest = digits_manifest(script, topology="RingTopology", topology_params={"fanout": 2}, training=TUTORIAL,
                                   privacy=privacy)
        extra: dict[str, Any] = {"mode": "pairwise", "pairs_per_round": PAIRS_PER_ROUND} if method == "ring" else {}
        cfg = SimConfig(**base, **extra)  # type: ignore[arg-type]
    else:
        manifest = digits_manifest(script, privacy=privacy)
        cfg = SimConfig(**base)  # type: ignore[arg-type]
    return simulate(script, manifest, cfg)


def entry_of(res: SimResult, eps: float) -> dict[str, Any]:
    curve = [r.mean_accuracy for r in res.rounds]
    sends = sum(r.model_sends for r in res.rounds) + (res.consensus.model_sends if res.consensus else 0)
    return {
        "epsilon": None if math.isinf(eps) else eps,
        "noise_sigma": sigma(eps),
        "curve": curve,
        "min_curve": [r.min_accuracy for r in res.rounds],
        "final_accuracy": res.final.mean_accuracy,
        "final_min_accuracy": res.final.min_accuracy,
        "last_round_accuracy": curve[-1],
        "consensus_steps": res.consensus_steps,
        "model_sends": sends,
        "mb_sent": sum(r.bytes_sent for r in res.rounds) / 1e6 + (res.consensus.bytes_sent / 1e6 if res.consensus else 0.0),
        "run_s": res.timing["run_s"],
    }


def sweep(script: PeerScript, methods: list[str], epsilons: list[float], rounds: int, seed: int, tag: str,
          curves: dict[str, list[Curve]] | None = None) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for method in methods:
        for eps in epsilons:
            res = run(script, method, eps, rounds, seed)
            results[method][eps_label(eps)] = entry_of(res, eps)
            if curves is not None:
                c = curve_of(res, f"eps={eps_label(eps)}")
                c.low = c.high = None  # five bands on one axes are unreadable; the JSON keeps the worst peer
                curves[method].append(c)
            print(f"tutorial {tag} method={method} eps={eps_label(eps)} final={pct(res.final.mean_accuracy)} "
                  f"worst={pct(res.final.min_accuracy)} run_s={res.timing['run_s']:.1f}", flush=True)
    return results


def table(results: dict[str, dict[str, Any]], methods: list[str], labels: list[str], rounds: int, r90: bool) -> str:
    cols = "".join(f" {METHODS[m]}: final |" + (" rounds to 90% |" if r90 else "") for m in methods)
    lines = ["| epsilon | sigma |" + cols, "|---:|---:|" + ("---:|---:|" if r90 else "---:|") * len(methods)]
    for lab in labels:
        first = results[methods[0]][lab]
        cells = []
        for m in methods:
            e = results[m][lab]
            cells.append(pct(e["final_accuracy"]))
            if r90:
                n = e["rounds_to_90pct_of_best"]
                cells.append(f"not in {rounds}" if n is None else f"{n} + consensus" if e["reached_in_consensus"] else str(n))
        lines.append(f"| {lab} | {first['noise_sigma']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="epsilon inf and 1, 8 rounds, FedAvg and the tutorial's ring")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/tutorial.json (quick: results/quick/)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the PNGs and the markdown tables go (default benchmarks/results, quick: results/quick)")
    args = ap.parse_args()
    base = RESULTS / "quick" if args.quick else RESULTS
    args.json = args.json or base / "tutorial.json"
    args.out_dir = args.out_dir or base
    quiet()
    script = digits_script()
    torch.set_num_threads(1)
    rounds = args.rounds or (8 if args.quick else 20)
    main_eps = [math.inf, 1.0] if args.quick else [math.inf, 8.0, 4.0, 2.0, 1.0]
    trade_eps = [64.0] if args.quick else [16.0, 32.0, 64.0, 256.0]
    methods = ["fedavg", "ring"] if args.quick else ["fedavg", "ring", "ring_push", "defaults"]
    trade_methods = ["fedavg", "ring"]
    started = time.perf_counter()

    curves: dict[str, list[Curve]] = {m: [] for m in methods}
    results = sweep(script, methods, main_eps, rounds, args.seed, "main", curves)
    # The tutorial's threshold: 90% of the method's own best (no-DP) final accuracy.
    # A series with a final consensus phase may first cross the threshold there: it counts as its last round.
    for method in methods:
        best = results[method]["inf"]["final_accuracy"]
        for entry in results[method].values():
            entry["threshold"] = 0.9 * best
            reached = rounds_to_threshold(entry["curve"], 0.9 * best)
            entry["reached_in_consensus"] = reached is None and entry["consensus_steps"] > 0 and entry["final_accuracy"] >= 0.9 * best
            entry["rounds_to_90pct_of_best"] = rounds if entry["reached_in_consensus"] else reached
    dp_applied = any(
        results[m][eps_label(e)]["curve"] != results[m]["inf"]["curve"] for m in methods for e in main_eps if not math.isinf(e)
    )
    if not dp_applied:
        print("warning: curves with and without DP are identical: this node build does not apply local DP", flush=True)
    tradeoff = sweep(script, trade_methods, trade_eps, rounds, args.seed, "tradeoff")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_panels([(f"{METHODS[m]}, {PEERS} peers, shards:2 digits" if m in ("fedavg", "ring") else METHODS[m], curves[m])
                 for m in methods], out / "tutorial_curves.png", ylabel="mean validation accuracy")
    labels = [eps_label(e) for e in main_eps]
    xs = list(range(len(main_eps)))
    plot_xy({METHODS[m]: (xs, [results[m][lab]["final_accuracy"] for lab in labels]) for m in methods},
            out / "tutorial_final_vs_epsilon.png", "final accuracy vs privacy budget (clip 2.0)", "epsilon",
            "final mean accuracy", labels, ylim=(0.0, 1.0))
    plot_xy({METHODS[m]: (xs, [results[m][lab]["rounds_to_90pct_of_best"] for lab in labels]) for m in methods},
            out / "tutorial_rounds_to_90.png", "rounds to 90% of the method's best (missing: never reached)",
            "epsilon", "rounds", labels, ylim=(0.0, rounds + 1.0))
    # The trade-off sweep beside the tutorial's points, strongest privacy left, as one curve per method.
    span = sorted([e for e in main_eps if not math.isinf(e)] + trade_eps) + [math.inf]
    span_labels = [eps_label(e) for e in span]
    merged = {m: {**results[m], **tradeoff[m]} for m in trade_methods}
    plot_xy({METHODS[m]: (list(range(len(span))), [merged[m][lab]["final_accuracy"] for lab in span_labels]) for m in trade_methods},
            out / "tutorial_tradeoff.png", "where the trade-off lives: final accuracy vs epsilon (clip 2.0)", "epsilon",
            "final mean accuracy", span_labels, ylim=(0.0, 1.0))

    main_table = table(results, methods, labels, rounds, r90=True)
    trade_table = table(tradeoff, trade_methods, [eps_label(e) for e in trade_eps], rounds, r90=False)
    print(main_table)
    print()
    print(trade_table)
    (out / "tutorial_table.md").write_text(main_table + "\n")
    (out / "tutorial_tradeoff.md").write_text(trade_table + "\n")
    headline = {f"{m}_final_eps_{lab}": round(results[m][lab]["final_accuracy"], 4) for m in methods for lab in labels
                if lab in ("inf", "1")}
    headline.update({f"{m}_final_eps_{eps_label(e)}": round(tradeoff[m][eps_label(e)]["final_accuracy"], 4)
                     for m in trade_methods for e in trade_eps})
    data = {
        "benchmark": "tutorial",
        "headline": headline,
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "setting": {"peers": PEERS, "rounds": rounds, "partition": "shards:2", "seed": args.seed, "clip_norm": CLIP,
                    "dp_delta": DELTA, "pairs_per_round": PAIRS_PER_ROUND, "script_args": SCRIPT_ARGS,
                    "tutorial_training": TUTORIAL, "clip_only_epsilon": CLIP_ONLY_EPSILON},
        "methods": {m: METHODS[m] for m in methods},
        "deviations": DEVIATIONS,
        "dp_applied": dp_applied,
        "results": results,
        "tradeoff": {"epsilons": trade_eps, "note": "same setting as the main sweep, weaker privacy: where noise stops "
                     "swamping the clipped update", "results": tradeoff, "markdown": trade_table},
        "markdown": main_table + "\n\nTrade-off sweep (same setting, weaker privacy):\n\n" + trade_table,
        "plots": ["tutorial_curves.png", "tutorial_final_vs_epsilon.png", "tutorial_rounds_to_90.png", "tutorial_tradeoff.png"],
        "seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
