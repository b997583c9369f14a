"""CHOCO gossip against uncompressed gossip and the reconstruct mode: accuracy and megabytes on the 20-peer digits
benchmark (shards:2, 20 rounds, manifest defaults otherwise: 4 local epochs, 6 final averaging-only exchanges).

    python benchmarks/bench_choco.py [--families digits-mlp-sgdm,logreg-sgd] [--seeds 0,1,2] [--rounds 20]
        [--settings 'A;B'] [--training-param local_steps=4] [--json PATH]
    python benchmarks/bench_choco.py --quick     # logistic regression, seed 0, 6 rounds, three settings (< 1 min)

Two model families (the bundled digits script's MLP with SGD momentum, and logistic regression with plain SGD from
benchmarks/scripts) and three seeds (0, 1, 2) by default. Settings: uncompressed gossip on the default RandomTopology
(fanout 3) and on ExpanderTopology (fanout 3: two hashed rings, degree 4, the graph CHOCO runs on), the reconstruct mode with
top-k 1% + error feedback on RandomTopology (what compression did before CHOCO), and CHOCO with top-k 1%, top-k
10%, int8 and QSGD (15 levels) on ExpanderTopology, each at its default consensus step (top-1% also at 0.05, the
former default, and 0.5). ``final``: the mean and worst
peer accuracy of the served models after the run; ``MB``: every byte the peers sent. ``headline`` (for
benchmarks/run_all.py): per family, the mean final accuracy of each setting and its bytes against the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from simkit import RESULTS, ROOT, pct, quiet, row

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.simulator import Overrides, SimConfig, simulate

FAMILIES = {
    "digits-mlp-sgdm": ROOT / "peer_scripts" / "digits_peer_script.py",
    "logreg-sgd": ROOT / "benchmarks" / "scripts" / "digits_logreg_sgd.py",
}
CHOCO = {"mode": "choco"}
SETTINGS: dict[str, tuple[str, dict[str, str]]] = {
    "uncompressed, random fanout 3": ("RandomTopology", {}),
    "uncompressed, expander": ("ExpanderTopology", {}),
    "reconstruct top-k 1% + EF, random": ("RandomTopology", {"top_k_ratio": "0.01"}),
    "choco top-k 1%": ("ExpanderTopology", {**CHOCO, "top_k_ratio": "0.01"}),
    "choco top-k 1%, step 0.05": ("ExpanderTopology", {**CHOCO, "top_k_ratio": "0.01", "consensus_step": "0.05"}),
    "choco top-k 1%, step 0.5": ("ExpanderTopology", {**CHOCO, "top_k_ratio": "0.01", "consensus_step": "0.5"}),
    "choco top-k 10%": ("ExpanderTopology", {**CHOCO, "top_k_ratio": "0.1"}),
    "choco int8": ("ExpanderTopology", {**CHOCO, "quantize_bits": "8"}),
    "choco QSGD 15": ("ExpanderTopology", {**CHOCO, "qsgd_levels": "15"}),
}
BASELINE = "uncompressed, random fanout 3"
QUICK_SETTINGS = ("uncompressed, random fanout 3", "choco top-k 10%", "choco int8")


def run(family: str, label: str, seed: int, rounds: int, training: dict[str, str]) -> dict[str, Any]:
    script = load_script(FAMILIES[family])
    topology, compression = SETTINGS[label]
    manifest = build_manifest(
        name="choco-bench", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology=topology)
    cfg = SimConfig(peers=20, rounds=rounds, partition="shards:2", seed=seed,
                    overrides=Overrides(compression_params=compression, training_params=training))
    r = row(simulate(script, manifest, cfg))
    print(f"family={family} setting={label!r} seed={seed} final={pct(r['final_mean_accuracy'])} "
          f"worst={pct(r['final_min_accuracy'])} MB={r['mb_sent']:.3f} ({r['run_s']:.0f} s)", flush=True)
    return {"family": family, "setting": label, "seed": seed, "topology": topology, "compression": compression,
            "training": training, **r}


def table(cells: list[dict[str, Any]], families: list[str]) -> str:
    lines = ["| setting | " + " | ".join(f"{f}: final (worst) | MB | x fewer bytes" for f in families) + " |",
             "|---|" + "---:|---:|---:|" * len(families)]
    for label in SETTINGS:
        if not any(c["setting"] == label for c in cells):
            continue
        out = []
        for f in families:
            mine = [c for c in cells if c["family"] == f and c["setting"] == label]
            base = [c for c in cells if c["family"] == f and c["setting"] == BASELINE]
            if not mine:
                out += ["-", "-", "-"]
                continue
            acc = statistics.fmean(c["final_mean_accuracy"] for c in mine)
            worst = min(c["final_min_accuracy"] for c in mine)
            mb = statistics.fmean(c["mb_sent"] for c in mine)
            base_mb = statistics.fmean(c["mb_sent"] for c in base) if base else None
            out += [f"{pct(acc)} ({pct(worst)})", f"{mb:.2f}", f"{base_mb / mb:.1f}" if base_mb else "-"]
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def headline(cells: list[dict[str, Any]], families: list[str]) -> dict[str, float]:
    """Flat numbers for run_all's summary: ``<family> <setting> acc`` and, against the baseline, ``x fewer``."""
    out: dict[str, float] = {}
    for f in families:
        base = [c["mb_sent"] for c in cells if c["family"] == f and c["setting"] == BASELINE]
        for label in SETTINGS:
            mine = [c for c in cells if c["family"] == f and c["setting"] == label]
            if not mine:
                continue
            out[f"{f} {label} acc"] = round(statistics.fmean(c["final_mean_accuracy"] for c in mine), 4)
            if base and label != BASELINE:
                out[f"{f} {label} x fewer"] = round(statistics.fmean(base) / statistics.fmean(c["mb_sent"] for c in mine), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settings", default=";".join(SETTINGS), help="semicolon-separated subset of the settings")
    ap.add_argument("--quick", action="store_true",
                    help="logistic regression, seed 0, 6 rounds, uncompressed / CHOCO top-k 10%% / CHOCO int8")
    ap.add_argument("--training-param", action="append", default=[], metavar="K=V",
                    help="manifest training override (repeatable), e.g. local_steps=4")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/choco.json (quick: results/quick/)")
    args = ap.parse_args()
    if args.quick:
        args.families, args.seeds, args.rounds, args.settings = "logreg-sgd", "0", 6, ";".join(QUICK_SETTINGS)
    args.json = args.json or RESULTS / ("quick" if args.quick else "") / "choco.json"
    quiet()
    families = [f for f in args.families.split(",") if f]
    labels = [s for s in args.settings.split(";") if s]
    for name in families:
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    for label in labels:
        if label not in SETTINGS:
            raise SystemExit(f"unknown setting {label!r}; known: {', '.join(SETTINGS)}")
    started = time.perf_counter()
    training = dict(kv.split("=", 1) for kv in args.training_param)
    cells = [run(f, label, int(seed), args.rounds, training)
             for f in families for label in labels for seed in args.seeds.split(",")]
    result = {"benchmark": "choco", "quick": args.quick, "peers": 20, "partition": "shards:2", "rounds": args.rounds,
              "seeds": args.seeds, "training": training, "headline": headline(cells, families),
              "cells": cells, "markdown": table(cells, families), "seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
