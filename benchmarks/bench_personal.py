"""Personalized models (issue 14): each peer's personal model on its own held-out test data, against local-only
training and the shared gossip model, for personalization none (the shared model), APFL and FedRep.

    python benchmarks/bench_personal.py                            # MLP, dirichlet:0.3 and shards:2, seeds 7, 1, 2
    python benchmarks/bench_personal.py --family cnn --splits shards:2 --variants APFL,FedRep
    python benchmarks/bench_personal.py --report                   # tables and PNG from the runs stored so far
    python benchmarks/bench_personal.py --quick                    # one seed, 8 rounds (benchmarks/run_all.py)

20 peers on scikit-learn's digits, the swarm defaults otherwise (FedAvg with slow momentum, random fanout 3, 4 local
epochs, the served model, 6 averaging-only exchanges after the last round), 20 rounds. Each peer's data is the
script's own split (``--partition script``) with ``own_holdout=0.3``: 30% of each of the peer's classes never trains
and is its own test set, the third loader of ``build_loaders``, on which ``own_accuracy`` is measured. Families:
``mlp`` (the bundled digits script: MLP 64-32-10, SGD momentum 0.9) and ``cnn`` (benchmarks/scripts/digits_cnn_sgdm:
conv 16, two linear layers, SGD momentum 0.9), ``logreg`` (one linear layer, plain SGD; FedRep refuses it, having no
backbone to share: leave FedRep out of ``--variants``).

Per run: ``own``: the personal model on its peer's own test data, mean and worst peer, after the last training
round and after the final merge; ``global``: the served shared model on the validation set (FedRep: the served
backbone under each peer's own head; local: each peer's own model); APFL's personal model on the validation set and
its learned alphas; model bytes sent per peer per training round. Runs are stored in ``--json`` as they finish
(keyed by family, split, variant and seed, for this configuration), so the grid can be run in pieces each shorter
than the benchmark time limit; every invocation rewrites the tables and the PNG (own-data curves, one panel per
family and split) from the stored runs.
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

from simkit import DIGITS, RESULTS, pct, quiet

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.report import Curve, communication, plot_panels
from quinkgl_cli.sim.simulator import Overrides, SimConfig, SimResult, Simulator

PEERS = 20
HOLDOUT = "0.3"
FAMILIES = {  # name: (peer script, the manifest's input shape)
    "mlp": (DIGITS, "64"),
    "cnn": (Path(__file__).resolve().parent / "scripts" / "digits_cnn_sgdm.py", "1,8,8"),
    "logreg": (Path(__file__).resolve().parent / "scripts" / "digits_logreg_sgd.py", "64"),
}
VARIANTS = {  # name: (simulator mode, personalization)
    "local only": ("local", "none"),
    "shared (none)": ("gossip", "none"),
    "APFL": ("gossip", "apfl"),
    "FedRep": ("gossip", "fedrep"),
}
BASELINES = ("local only", "shared (none)")


def one(family: str, mode: str, personalization: str, split: str, seed: int, rounds: int) -> dict[str, Any]:
    path, input_shape = FAMILIES[family]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the benchmark scripts import their data half
    script = load_script(path)
    cfg = SimConfig(peers=PEERS, rounds=rounds, partition="script", seed=seed, mode=mode,  # type: ignore[arg-type]
                    script_args={"partition": split, "seed": str(seed), "own_holdout": HOLDOUT},
                    overrides=Overrides(personalization=personalization))
    started = time.perf_counter()
    result: SimResult = Simulator(script, manifest(script, input_shape), cfg).run()
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
        "bytes_per_peer_per_round": comm["training_bytes"] / (PEERS * len(result.rounds)),
        "mb_sent": comm["bytes_sent_total"] / 1e6,
        "seconds": time.perf_counter() - started,
    }


def manifest(script: PeerScript, input_shape: str) -> Manifest:
    """What `quinkgl manifest create --from-script` makes for the family's script, the swarm defaults."""
    return build_manifest(
        name="digits-bench", task_type="classification", input_shape=input_shape, output_shape="10",
        label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
        aggregation="FedAvg", topology="RandomTopology")


def mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.mean(xs) if xs else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = ("own_last", "own_final", "global_last", "global_final", "personal_global_final", "alpha_mean",
            "bytes_per_peer_per_round", "mb_sent")
    return {name: {k: mean([r[k] for r in rs]) for k in keys}
            | {"own_final_worst": min(r["own_final_worst"] for r in rs),
               "own_last_worst": min(r["own_last_worst"] for r in rs),
               "seeds": [r["seed"] for r in rs]}
            for name, rs in runs.items() if rs}


def verdict(summary: dict[str, dict[str, Any]], name: str) -> str:
    """Own accuracy after the final merge minus the better baseline's, and whether it meets the aim: above both,
    by >= 2 points where the better baseline leaves 2 points of headroom (else above it)."""
    bases = [summary[b]["own_final"] for b in BASELINES if b in summary]
    if not bases or name in BASELINES:
        return ""
    best = max(bases)
    gain = summary[name]["own_final"] - best
    need = 0.02 if 1.0 - best >= 0.02 else 0.0
    return f"{100 * gain:+.1f} ({'meets' if gain >= need and gain > 0 else 'misses'})"


def split_table(family: str, split: str, rounds: int, runs: dict[str, list[dict[str, Any]]]) -> str:
    summary = summarize(runs)
    seeds = sorted({s for v in summary.values() for s in v["seeds"]})
    shared_bytes = summary.get("shared (none)", {}).get("bytes_per_peer_per_round")
    lines = [f"{family}, {PEERS} peers, digits, {split}, own_holdout {HOLDOUT}, {rounds} rounds, seeds "
             f"{', '.join(map(str, seeds))} (mean over seeds; worst peer: the lowest over seeds)", "",
             "| training | own test data, last round (worst peer) | after the final merge (worst peer) | "
             "vs better baseline (aim) | validation set | bytes / peer / round |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        extra = f" (personal {pct(s['personal_global_final'])}, alpha {s['alpha_mean']:.2f})" \
            if s["personal_global_final"] is not None else ""
        saved = ""
        if shared_bytes and name != "local only" and s["bytes_per_peer_per_round"] < shared_bytes:
            saved = f" ({100 * (1 - s['bytes_per_peer_per_round'] / shared_bytes):.0f}% saved)"
        lines.append(f"| {name} | {pct(s['own_last'])} ({pct(s['own_last_worst'])}) | {pct(s['own_final'])} "
                     f"({pct(s['own_final_worst'])}) | {verdict(summary, name)} | {pct(s['global_final'])}{extra} | "
                     f"{s['bytes_per_peer_per_round']:,.0f}{saved} |")
    return "\n".join(lines)


def curves(runs: dict[str, list[dict[str, Any]]], rounds: int) -> list[Curve]:
    xs = list(range(1, rounds + 1))
    return [Curve(name, xs, [mean([r["own_curve"][i] for r in rs]) for i in range(rounds)],
                  low=[min(r["own_curve"][i] for r in rs) for i in range(rounds)],
                  high=[max(r["own_curve"][i] for r in rs) for i in range(rounds)],
                  final=mean([r["own_final"] for r in rs]) if VARIANTS[name][0] == "gossip" else None)
            for name, rs in runs.items() if rs]


def grouped(store: dict[str, Any]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """Stored runs by (family, split), then variant in `VARIANTS` order, seeds in run order."""
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for key, run in store.items():
        family, split, name, _ = key.split("|")
        out.setdefault((family, split), {v: [] for v in VARIANTS})[name].append(run)
    return out


def report(store: dict[str, Any], rounds: int, path: Path, started: float) -> None:
    groups = grouped(store)
    tables, panels, summaries = [], [], {}
    for (family, split), runs in sorted(groups.items()):
        tables.append(split_table(family, split, rounds, runs))
        panels.append((f"{family}, {split}: personal model on own held-out data", curves(runs, rounds)))
        summaries[f"{family}|{split}"] = summarize(runs)
    headline = {f"{key}|{name}|own_final": s["own_final"] for key, summary in summaries.items()
                for name, s in summary.items()}
    out = {"peers": PEERS, "rounds": rounds, "own_holdout": float(HOLDOUT), "headline": headline, "summaries": summaries,
           "markdown": "\n\n".join(tables), "runs": store, "seconds_this_invocation": time.perf_counter() - started}
    atomic_write_bytes(path, (json.dumps(out, indent=2) + "\n").encode())
    if panels:
        plot_panels(panels, path.with_suffix(".png"), ylabel="accuracy on own held-out test data")
    print("\n\n".join(tables) + f"\n\nwrote {path} and {path.with_suffix('.png')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mlp", choices=sorted(FAMILIES))
    ap.add_argument("--splits", default="dirichlet:0.3,shards:2")
    ap.add_argument("--seeds", default="7,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="one seed, 8 rounds")
    ap.add_argument("--report", action="store_true", help="only rewrite the tables and PNG from the stored runs")
    ap.add_argument("--fresh", action="store_true", help="forget the stored runs first")
    ap.add_argument("--json", type=Path, default=RESULTS / "personal.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.rounds = "7", 8
    quiet()
    started = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; pick from {', '.join(VARIANTS)}")
    mine: dict[str, Any] = {}
    if not args.report:
        for split in args.splits.split(","):
            for name in variants:
                mode, personalization = VARIANTS[name]
                for seed in (int(s) for s in args.seeds.split(",")):
                    r = one(args.family, mode, personalization, split, seed, args.rounds)
                    mine[f"{args.family}|{split}|{name}|{seed}"] = {"seed": seed, **r}
                    print(f"{args.family} {split} {name} seed={seed} own={pct(r['own_final'])} "
                          f"(worst {pct(r['own_final_worst'])}) global={pct(r['global_final'])} {r['seconds']:.0f}s",
                          flush=True)
    # Read only now: pieces of the grid may run side by side, each adding its runs to what the others stored.
    store = {} if args.fresh else stored(args.json, args.rounds)
    report(store | mine, args.rounds, args.json, started)


def stored(path: Path, rounds: int) -> dict[str, Any]:
    """The runs ``path`` holds for this configuration (none when it is another one's)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    return old.get("runs", {}) if old.get("rounds") == rounds and old.get("own_holdout") == float(HOLDOUT) else {}


if __name__ == "__main__":
    main()
