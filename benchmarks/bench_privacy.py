"""Accuracy against a whole-run privacy budget: DP-SGD (privacy mode dp_sgd) and local DP of the shared update
(local_update), on the 20-peer digits benchmark, IID and shards:2.

    python benchmarks/bench_privacy.py                                   # eps 1 2 4 8 16 inf, both splits, seed 0
    python benchmarks/bench_privacy.py --epsilons 8 --seeds 1 2          # more seeds at one budget
    python benchmarks/bench_privacy.py --family logreg --epsilons 8      # another model family
    python benchmarks/bench_privacy.py --report-only                     # table and plot from the JSON
    python benchmarks/bench_privacy.py --family cnn --epsilons 8 --modes dp_sgd --variant 'clip 3'   # one lever

Every run: 20 peers, 20 rounds, gossip with the manifest defaults (FedAvg, random fanout 3, 4 local epochs, final
averaging-only exchanges), the digits script's own optimizer (SGD lr 0.05 momentum 0.9, batch 32). A budget is
the total (epsilon, delta = 1e-5) per peer for the whole run:
- ``dp_sgd``: the manifest's ``dp_sgd`` section with that epsilon and the defaults (clip 1.0, Poisson sampling at
  q = batch / training-set size); the node derives its noise multiplier from the budget before the run;
- ``local_update``: the per-round epsilon whose 20 releases compose (RDP, the same accountant) to that total,
  clip 1.0 (the manifest default), the total also set as ``dp_total_epsilon``;
- ``inf``: no DP at all (one run per split, shown in both series).
Aim (issue 15): dp_sgd at epsilon 8 reaches >= 75% mean accuracy on IID and >= 60% on shards:2.
``--variant`` runs one lever against those defaults (a clip norm, plain averaging instead of the slow-momentum
default, fewer local epochs, a batch as large as a peer's data); its rows carry the variant's name.
Writes JSON (default ``benchmarks/results/privacy.json``, updated after every run; runs of other seeds, budgets and
families already in it are kept), prints a markdown table (means over seeds) and draws
``benchmarks/results/privacy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from simkit import RESULTS, ROOT, digits_manifest, quiet

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.simulator import Overrides, SimConfig, SimResult, simulate
from quinkgl_cli.strategies.dp_accountant import plan_noise_multiplier
from quinkgl_cli.strategies.privacy import gaussian_sigma, rdp_epsilon

PEERS = 20
ROUNDS = 20
DELTA = 1e-5
CLIP = 1.0
FAMILIES = {
    "digits-mlp": ROOT / "peer_scripts" / "digits_peer_script.py",
    "logreg": ROOT / "benchmarks" / "scripts" / "digits_logreg_sgd.py",
    "cnn": ROOT / "benchmarks" / "scripts" / "digits_cnn_sgdm.py",
}
INPUT_SHAPES = {"digits-mlp": "64", "logreg": "64", "cnn": "1,8,8"}
AIM = {"iid": 0.75, "shards:2": 0.60}
DEFAULT = "default"
# Levers against the defaults, none of them a default: what each changes of the run.
VARIANTS: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "clip 0.3": {"clip": 0.3},
    "clip 3": {"clip": 3.0},
    "plain averaging": {"overrides": Overrides(aggregation="FedAvgM", aggregation_params={"server_momentum": "0"})},
    "2 local epochs": {"overrides": Overrides(training_params={"local_epochs": "2"})},
    "batch 72": {"script_args": {"batch_size": "72"}},  # q = 1 on a peer of 72 examples or fewer
}
KEY = ("family", "partition", "mode", "epsilon", "seed", "variant")


def local_epsilon_per_round(total: float, rounds: int) -> float:
    """The largest per-round epsilon (to 0.1%) whose ``rounds`` Gaussian releases compose to at most ``total``."""
    lo, hi = total / rounds, total
    while hi - lo > 1e-3 * lo:
        mid = math.sqrt(lo * hi)
        z = gaussian_sigma(CLIP, mid, DELTA) / CLIP
        lo, hi = (mid, hi) if rdp_epsilon(z, rounds, DELTA) <= total else (lo, mid)
    return lo


def privacy_of(mode: str, eps: float, clip: float = CLIP) -> dict[str, Any]:
    if math.isinf(eps):
        return {}
    if mode == "dp_sgd":
        return {"mode": "dp_sgd", "dp_total_epsilon": eps, "dp_delta": DELTA, "dp_clip_norm": clip}
    return {"dp_epsilon": local_epsilon_per_round(eps, ROUNDS), "dp_total_epsilon": eps, "dp_delta": DELTA,
            "dp_clip_norm": clip}


def typical_noise(mode: str, eps: float, peer_samples: float) -> float | None:
    """The noise multiplier of a peer of typical size (the nodes derive their own from their data size)."""
    if math.isinf(eps):
        return None
    if mode == "local_update":
        return gaussian_sigma(CLIP, local_epsilon_per_round(eps, ROUNDS), DELTA) / CLIP
    rate = min(1.0, 32 / peer_samples)
    steps = 4 * math.ceil(1 / rate)
    return plan_noise_multiplier(eps, DELTA, rate, ROUNDS * steps, 30.0)


def run(script: PeerScript, family: str, mode: str, eps: float, partition: str, seed: int,
        variant: str = DEFAULT) -> SimResult:
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest

    lever = VARIANTS[variant]
    privacy = privacy_of(mode, eps, lever.get("clip", CLIP))
    if family == "digits-mlp":
        manifest = digits_manifest(script, privacy=privacy)
    else:
        manifest = build_manifest(
            name="privacy-bench", task_type="classification", input_shape=INPUT_SHAPES[family], output_shape="10",
            label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
            aggregation="FedAvg", topology="RandomTopology", privacy_params=privacy)
    cfg = SimConfig(peers=PEERS, rounds=ROUNDS, partition=partition, seed=seed,
                    script_args=lever.get("script_args", {}), overrides=lever.get("overrides", Overrides()))
    return simulate(script, manifest, cfg)


def label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def table(runs: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, str, str, str], list[float]] = {}
    present = {(r["family"], r["partition"], r["mode"]) for r in runs}
    for r in runs:
        modes = [m for m in ("dp_sgd", "local_update") if (r["family"], r["partition"], m) in present] \
            if r["epsilon"] == "inf" else [_mode_label(r)]
        for mode in modes:
            cells.setdefault((r["family"], r["partition"], mode, r["epsilon"]), []).append(r["final_mean_accuracy"])
    lines = ["| family | split | mode | " + " | ".join(f"eps {e}" for e in ("1", "2", "4", "8", "16", "inf")) + " |",
             "|---|---|---|" + "---:|" * 6]
    for fam, part, mode in sorted({k[:3] for k in cells}):
        row = []
        for e in ("1", "2", "4", "8", "16", "inf"):
            vals = cells.get((fam, part, mode, e))
            row.append("-" if not vals else f"{100 * statistics.mean(vals):.1f}%" + (
                f" (n={len(vals)}, {100 * min(vals):.1f}-{100 * max(vals):.1f})" if len(vals) > 1 else ""))
        lines.append(f"| {fam} | {part} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines)


EPS_AXIS = ("1", "2", "4", "8", "16", "inf")


def _mode_label(r: dict[str, Any]) -> str:
    variant = r.get("variant", DEFAULT)
    return r["mode"] if variant == DEFAULT else f"{r['mode']}, {variant}"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Mean final accuracy against the budget, one line per (family, split, mode); inf drawn at the right end."""
    from quinkgl_cli.sim.report import plot_xy

    series: dict[str, tuple[list[float], list[float | None]]] = {}
    for fam, part, mode in sorted({(r["family"], r["partition"], r["mode"]) for r in runs
                                   if r["mode"] != "none" and r.get("variant", DEFAULT) == DEFAULT}):
        ys: list[float | None] = []
        for e in EPS_AXIS:
            vals = [r["final_mean_accuracy"] for r in runs if r["family"] == fam and r["partition"] == part
                    and r["epsilon"] == e and (r["mode"] == mode or e == "inf") and r.get("variant", DEFAULT) == DEFAULT]
            ys.append(statistics.mean(vals) if vals else None)
        if sum(y is not None for y in ys) > 1:
            series[f"{fam} {part} {mode}"] = (list(range(len(EPS_AXIS))), ys)
    if not series:  # a single budget (e.g. only inf) has no curve to draw
        return
    plot_xy(series, path, f"{PEERS} peers, {ROUNDS} rounds, delta {DELTA:g}: accuracy against the run's total epsilon",
            "total epsilon per peer (whole run)", "final mean accuracy", xticklabels=list(EPS_AXIS), ylim=(0.0, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="digits-mlp")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8, 16, math.inf])
    ap.add_argument("--modes", nargs="+", default=["dp_sgd", "local_update"], choices=["dp_sgd", "local_update"])
    ap.add_argument("--partitions", nargs="+", default=["iid", "shards:2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variant", choices=list(VARIANTS), default=DEFAULT, help="one lever against the defaults")
    ap.add_argument("--json", type=Path, default=RESULTS / "privacy.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "privacy_vs_epsilon.png")
    ap.add_argument("--report-only", action="store_true", help="table and plot from the JSON, no runs")
    args = ap.parse_args()
    if args.report_only:
        args.seeds = []
    quiet()
    script = load_script(FAMILIES[args.family])
    doc: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
    doc.update(peers=PEERS, rounds=ROUNDS, delta=DELTA, clip_norm=CLIP, python=platform.python_version())
    peer_samples = 1437 / PEERS
    for seed in args.seeds:
        for partition in args.partitions:
            for eps in args.epsilons:
                for mode in (["none"] if math.isinf(eps) else args.modes):
                    started = time.perf_counter()
                    res = run(script, args.family, mode, eps, partition, seed, args.variant)
                    entry = {"family": args.family, "partition": partition, "mode": mode, "epsilon": label(eps),
                             "seed": seed, "variant": args.variant, "final_mean_accuracy": res.final.mean_accuracy,
                             "final_min_accuracy": res.final.min_accuracy,
                             "curve": [r.mean_accuracy for r in res.rounds],
                             "noise_multiplier_typical_peer": None if mode == "none" else typical_noise(mode, eps, peer_samples),
                             "run_s": round(time.perf_counter() - started, 1)}
                    doc["runs"] = [r for r in doc["runs"] if {k: r.get(k, DEFAULT) for k in KEY} != {k: entry[k] for k in KEY}]
                    doc["runs"].append(entry)
                    atomic_write_bytes(args.json, (json.dumps(doc, indent=1) + "\n").encode())
                    print(f"{args.family} {partition} {mode} eps={label(eps)} seed={seed} {args.variant}: "
                          f"{100 * res.final.mean_accuracy:.1f}% (min {100 * res.final.min_accuracy:.1f}%) "
                          f"{entry['run_s']} s", flush=True)
    print(table(doc["runs"]))
    plot(doc["runs"], args.plot)
    hits = [r for r in doc["runs"] if r["mode"] == "dp_sgd" and r["epsilon"] == "8" and r.get("variant", DEFAULT) == DEFAULT]
    for family in sorted({r["family"] for r in hits}):
        for part, aim in AIM.items():
            vals = [r["final_mean_accuracy"] for r in hits if r["partition"] == part and r["family"] == family]
            if vals:
                print(f"aim {family} {part} eps 8 >= {100 * aim:.0f}%: {100 * statistics.mean(vals):.1f}% "
                      f"over {len(vals)} seed(s)")


if __name__ == "__main__":
    sys.exit(main())
