"""Learning that holds on any model and split, at every round: gossip against star FedAvg and centralized training.

    python benchmarks/bench_learning.py            # 3 families x 3 splits x 3 seeds, 20 rounds
    python benchmarks/bench_learning.py --quick    # 3 families x 3 splits x 1 seed, 12 rounds

Families (``benchmarks/scripts/``, written as a user would, each with its own optimizer): an MLP with Adam, a small
CNN with max pooling and SGD momentum 0.9, logistic regression with plain SGD, all on scikit-learn's digits.
Splits: ``shards:2`` (20 peers, two label shards each), ``classes:3`` (4 peers, three consecutive classes each) and
``dirichlet:0.1`` (20 peers). Each cell runs, in the same process: gossip with the swarm defaults (or a lever, see
``--lever``), star FedAvg (a server that sees every client every round) and centralized training (one node, all
data), for every seed.

Per cell: the anytime accuracy (what the peers hold at the end of each round from round ``--from-round`` on, with no
end-of-run merge: the mean over those rounds of the round's mean, the lowest round mean and the worst single peer
at any of those rounds), the largest drop of one peer's accuracy between two consecutive rounds from that round on,
model sends per peer per training round, and the accuracy after the final averaging-only exchanges (the merge).
Goal (issue 11): anytime >= 85% mean and >= 80% worst peer, drops <= 5 points, <= 3 sends per peer per round.
Writes JSON (default ``benchmarks/results/learning.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quinkgl_cli.atomic import atomic_write_bytes  # noqa: E402
from quinkgl_cli.manifest.arch_hash import compute_arch_hash  # noqa: E402
from quinkgl_cli.manifest.create import build_manifest  # noqa: E402
from quinkgl_cli.manifest.schema import Manifest  # noqa: E402
from quinkgl_cli.node.script import PeerScript, load_script  # noqa: E402
from quinkgl_cli.sim.report import communication  # noqa: E402
from quinkgl_cli.sim.simulator import Overrides, SimConfig, SimResult, simulate  # noqa: E402

SCRIPTS = ROOT / "benchmarks" / "scripts"
FAMILIES = {
    "mlp-adam": (SCRIPTS / "digits_mlp_adam.py", "64"),
    "cnn-sgdm": (SCRIPTS / "digits_cnn_sgdm.py", "1,8,8"),
    "logreg-sgd": (SCRIPTS / "digits_logreg_sgd.py", "64"),
    # The project's own benchmark (issue 11's goal 1): the bundled digits script, MLP 64-32-10, SGD momentum 0.9.
    "digits-mlp-sgdm": (ROOT / "peer_scripts" / "digits_peer_script.py", "64"),
    # Written after the defaults were chosen, as checks that they hold beyond the families they were measured on.
    "bn-cnn-adamw": (SCRIPTS / "digits_bn_cnn_adamw.py", "1,8,8"),
    "mlp-rmsprop": (SCRIPTS / "digits_mlp_rmsprop.py", "64"),
    "mlp-sgd-plain": (SCRIPTS / "digits_mlp_sgd_plain.py", "64"),
    "ln-gelu-adam": (SCRIPTS / "digits_ln_gelu_adam.py", "64"),
    "mlp-adagrad": (SCRIPTS / "digits_mlp_adagrad.py", "64"),
}
SPLITS = {"shards:2": 20, "classes:3": 4, "dirichlet:0.1": 20}
GOAL = {"anytime_mean": 0.85, "anytime_worst": 0.80, "max_drop": 0.05, "sends_per_peer_per_round": 3.0}


@dataclass(frozen=True)
class Lever:
    """One gossip setting under test: manifest overrides, plus node behaviour the prototype switches on."""

    name: str
    training: dict[str, str] = field(default_factory=dict)
    aggregation: str | None = None
    aggregation_params: dict[str, str] = field(default_factory=dict)
    fanout: int | None = None
    node: dict[str, Any] = field(default_factory=dict)
    topology: str | None = None


LEVERS: dict[str, Lever] = {lever.name: lever for lever in (
    Lever("defaults"),
    # Plain averaging (no slow momentum, `strategies.momentum`): FedAvgM with momentum 0 is FedAvg exactly.
    Lever("no-momentum", aggregation="FedAvgM", aggregation_params={"server_momentum": "0"}),
    Lever("no-serving", node={"serving": False}),
    Lever("scaffold", aggregation="Scaffold"),
    Lever("scaffold-no-serving", aggregation="Scaffold", node={"serving": False}),
    Lever("scaffold-fanout1", aggregation="Scaffold", fanout=1),
    Lever("fanout2", fanout=2),
    # The same 3 sends per peer per round as fanout 3, spent as 3 exchanges of one send each (3 hops of mixing).
    Lever("fanout1-steps3", fanout=1, training={"gossip_steps": "3"}),
    Lever("epochs1", training={"local_epochs": "1"}),
    Lever("epochs2", training={"local_epochs": "2"}),
    Lever("epochs8", training={"local_epochs": "8"}),
    Lever("steps16", training={"local_steps": "16"}),
    Lever("reset-momentum", node={"reset": "momentum"}),
    Lever("reset-all", node={"reset": "all"}),
    # The optimizer's state after an aggregation (`node.moments`): the defaults floor Adam's second moments at their
    # median and mix SGD's momentum buffers half and half with the round's movement (= "sgd-qgm0.5"); "no-floor",
    # "no-global-momentum" and "no-moment-rules" are the node without them; the rest replace the rule they touch
    # (LEARNING.md, "The optimizer's state at aggregation"): vfloorS floors at S times the mean, vqQ at the
    # Q-quantile, qgmMU keeps MU of the own first moments (adam-/sgd-: that optimizer's only).
    Lever("no-floor", node={"floor": False}),
    Lever("no-global-momentum", node={"global_momentum": False}),
    Lever("no-moment-rules", node={"floor": False, "global_momentum": False}),
    Lever("adam-all", node={"reset": "adam-all"}),
    Lever("adam-m", node={"reset": "adam-m"}),
    Lever("adam-v", node={"reset": "adam-v"}),
    Lever("scale-m", node={"reset": "scale-m"}),
    Lever("adam-scale-m", node={"reset": "adam-scale-m"}),
    Lever("adam-step0", node={"reset": "adam-step0"}),
    Lever("qgm", node={"qgm": 0.0}),
    Lever("vfloor", node={"reset": "vfloor"}),
    Lever("vfloor0.1", node={"reset": "vfloor0.1"}),
    Lever("vfloor0.3", node={"reset": "vfloor0.3"}),
    Lever("vfloor0.5", node={"reset": "vfloor0.5"}),
    Lever("vfloor2", node={"reset": "vfloor2"}),
    Lever("vfloor-dim0", node={"reset": "vfloor-dim0"}),
    Lever("vq0.5", node={"reset": "vq0.5"}),
    Lever("vq0.75", node={"reset": "vq0.75"}),
    Lever("vq0.9", node={"reset": "vq0.9"}),
    Lever("floor+qgm0.5", node={"reset": "vfloor", "qgm": 0.5, "adaptive_only": True}),
    Lever("vfloor4", node={"reset": "vfloor4"}),
    Lever("vmax", node={"reset": "vmax"}),
    Lever("qgm0.5", node={"qgm": 0.5}),
    Lever("qgm0.9", node={"qgm": 0.9}),
    Lever("adam-qgm", node={"qgm": 0.0, "adaptive_only": True}),
    Lever("sgd-qgm", node={"qgm": 0.0, "sgd_only": True}),
    Lever("sgd-qgm0.5", node={"qgm": 0.5, "sgd_only": True}),
    Lever("adam-qgm0.5", node={"qgm": 0.5, "adaptive_only": True}),
    Lever("fedavgm", aggregation="FedAvgM"),
    Lever("fedavgm-0.5", aggregation="FedAvgM", aggregation_params={"server_momentum": "0.5"}),
    Lever("no-merge", training={"final_consensus_steps": "0"}),
    # Levers measured against the random topology (benchmarks/LEARNING.md, "Levers tried with the served model"):
    # horizon-free decay of the local learning rate, a moving average of the served model over rounds, training
    # from a mix of the held and served models, served entries weighted by age.
    Lever("lr-h2", topology="RandomTopology", node={"lr_halflife": 2}),
    Lever("lr-h5", topology="RandomTopology", node={"lr_halflife": 5}),
    Lever("lr-h10", topology="RandomTopology", node={"lr_halflife": 10}),
    Lever("serve-ema0.5", topology="RandomTopology", node={"serve_ema": 0.5}),
    Lever("serve-ema0.7", topology="RandomTopology", node={"serve_ema": 0.7}),
    Lever("mix0.5", topology="RandomTopology", node={"mix_start": 0.5}),
    Lever("serve-age0.8", topology="RandomTopology", node={"serve_age": 0.8}),
    # The default before RotationTopology: uniform random picks of fanout known peers each round.
    Lever("random-topology", topology="RandomTopology"),
    Lever("shuffle", topology="RandomTopology", node={"topology": "shuffle"}),
    Lever("rotation+ema0.5", node={"serve_ema": 0.5}),
    # Local work of at least N optimizer steps a round (whole passes) for peers whose 4 epochs take fewer (LEARNING.md,
    # "Local work counted in steps"). "no-min-steps" is the node as it is (local_epochs passes): the name it had
    # while a floor of 48 was the node's default on the branch that measured it, whose JSON calls that floor "defaults".
    Lever("no-min-steps", node={"min_steps": 0}),
    Lever("min-steps16", node={"min_steps": 16}),
    Lever("min-steps24", node={"min_steps": 24}),
    Lever("min-steps32", node={"min_steps": 32}),
    Lever("min-steps48", node={"min_steps": 48}),
    Lever("min-steps96", node={"min_steps": 96}),
    # Served entries weighted G ** age on RotationTopology (serve-age0.8 above ran on the random topology).
    Lever("rotation+age0.8", node={"serve_age": 0.8}),
    Lever("rotation+age0.6", node={"serve_age": 0.6}),
)}


def manifest_for(script: PeerScript, input_shape: str) -> Manifest:
    return build_manifest(
        name="learning-bench", task_type="classification", input_shape=input_shape, output_shape="10",
        label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
        aggregation="FedAvg", topology="RotationTopology",
    )


def anytime(result: SimResult, from_round: int) -> dict[str, Any]:
    """The numbers of the model the peers hold at the end of each round from ``from_round`` on."""
    rounds = [r for r in result.rounds if r.round >= from_round]
    means = [r.mean_accuracy for r in rounds if r.mean_accuracy is not None]
    worst = [r.min_accuracy for r in rounds if r.min_accuracy is not None]
    per_peer: dict[str, list[float]] = {}
    for r in rounds:
        for p in r.peers:
            if p.val_accuracy is not None and not p.attacker:
                per_peer.setdefault(p.peer, []).append(p.val_accuracy)
    drops = [a - b for accs in per_peer.values() for a, b in zip(accs, accs[1:], strict=False)]
    comm = communication(result)
    return {
        "anytime_mean": statistics.fmean(means) if means else None,
        "anytime_lowest_round_mean": min(means) if means else None,
        "anytime_worst": min(worst) if worst else None,
        "max_drop": max(drops) if drops else 0.0,
        "sends_per_peer_per_round": comm["sends_per_peer_per_round"],
        "kb_per_peer_per_round": comm["training_bytes"] / max(len(result.node_ids) * len(result.rounds), 1) / 1e3,
        "final_mean": result.final.mean_accuracy,
        "final_worst": result.final.min_accuracy,
        "curve": [r.mean_accuracy for r in result.rounds],
        "worst_curve": [r.min_accuracy for r in result.rounds],
    }


def run_gossip(script: PeerScript, manifest: Manifest, split: str, peers: int, rounds: int, seed: int,
               lever: Lever, patch: Callable[[Lever], Any]) -> SimResult:
    cfg = SimConfig(peers=peers, rounds=rounds, partition=split, seed=seed,
                    overrides=Overrides(aggregation=lever.aggregation, aggregation_params=lever.aggregation_params,
                                        training_params=lever.training,
                                        fanout=lever.fanout, topology=lever.topology))
    with patch(lever):
        return simulate(script, manifest, cfg)


_CENTRALIZED: dict[tuple[str, int, int], dict[str, Any]] = {}


def cell(family: str, split: str, seeds: list[int], rounds: int, from_round: int, levers: list[Lever],
         baselines: bool, patch: Callable[[Lever], Any]) -> dict[str, Any]:
    path, input_shape = FAMILIES[family]
    script = load_script(path)
    manifest = manifest_for(script, input_shape)
    peers = SPLITS[split]
    out: dict[str, Any] = {"family": family, "split": split, "peers": peers, "rounds": rounds, "seeds": seeds}
    for lever in levers:
        runs = []
        for seed in seeds:
            started = time.perf_counter()
            result = run_gossip(script, manifest, split, peers, rounds, seed, lever, patch)
            runs.append({"seed": seed, "seconds": time.perf_counter() - started, **anytime(result, from_round)})
        out[f"gossip:{lever.name}"] = summarize(runs)
        print(f"{family:10s} {split:13s} {lever.name:16s} {line(out[f'gossip:{lever.name}'])}", flush=True)
    if baselines:
        star, central = [], []
        for seed in seeds:
            fed = simulate(script, manifest, SimConfig(peers=peers, rounds=rounds, partition=split, seed=seed,
                                                       mode="fedavg", clients_per_round=peers))
            star.append({"seed": seed, **anytime(fed, from_round)})
            key = (family, seed, rounds)
            if key not in _CENTRALIZED:  # one node with all the data: the same run whatever the split
                alone = simulate(script, manifest, SimConfig(peers=1, rounds=rounds, partition="iid", seed=seed,
                                                             mode="local"))
                _CENTRALIZED[key] = {"seed": seed, **anytime(alone, from_round)}
            central.append(_CENTRALIZED[key])
        out["star_fedavg"] = summarize(star)
        out["centralized"] = summarize(central)
        print(f"{family:10s} {split:13s} {'star FedAvg':16s} {line(out['star_fedavg'])}", flush=True)
        print(f"{family:10s} {split:13s} {'centralized':16s} {line(out['centralized'])}", flush=True)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, except the worst-case numbers, which take the worst seed."""
    def pick(key: str, how: Callable[[list[float]], float]) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return how(values) if values else None

    return {
        "anytime_mean": pick("anytime_mean", statistics.fmean),
        "anytime_lowest_round_mean": pick("anytime_lowest_round_mean", min),
        "anytime_worst": pick("anytime_worst", min),
        "max_drop": pick("max_drop", max),
        "sends_per_peer_per_round": pick("sends_per_peer_per_round", statistics.fmean),
        "kb_per_peer_per_round": pick("kb_per_peer_per_round", statistics.fmean),
        "final_mean": pick("final_mean", statistics.fmean),
        "final_worst": pick("final_worst", min),
        "runs": runs,
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def line(s: dict[str, Any]) -> str:
    return (f"anytime mean {pct(s['anytime_mean'])} lowest-round {pct(s['anytime_lowest_round_mean'])} "
            f"worst {pct(s['anytime_worst'])} max-drop {pct(s['max_drop'])} sends {s['sends_per_peer_per_round']:.2f} "
            f"kB {s['kb_per_peer_per_round']:.0f} "
            f"final {pct(s['final_mean'])}/{pct(s['final_worst'])}")


def table(cells: list[dict[str, Any]], levers: list[Lever]) -> str:
    rows = ["| family | split | setting | anytime mean | lowest round mean | worst peer | max drop | sends/peer/round "
            "| kB/peer/round | final mean / worst |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        names = [f"gossip:{lv.name}" for lv in levers] + ["star_fedavg", "centralized"]
        for name in names:
            s = c.get(name)
            if s is None:
                continue
            rows.append(f"| {c['family']} | {c['split']} | {name} | {pct(s['anytime_mean'])} | "
                        f"{pct(s['anytime_lowest_round_mean'])} | {pct(s['anytime_worst'])} | {pct(s['max_drop'])} | "
                        f"{s['sends_per_peer_per_round']:.2f} | {s['kb_per_peer_per_round']:.0f} | "
                        f"{pct(s['final_mean'])} / {pct(s['final_worst'])} |")
    return "\n".join(rows)


def plot(cells: list[dict[str, Any]], levers: list[Lever], path: Path) -> None:
    """One panel per family and split: each setting's mean accuracy per round (mean over seeds), worst peer dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(c["family"] for c in cells))
    splits = list(dict.fromkeys(c["split"] for c in cells))
    fig, axes = plt.subplots(len(splits), len(families), figsize=(4.2 * len(families), 3.2 * len(splits)),
                             squeeze=False, sharey=True)
    names = [f"gossip:{lv.name}" for lv in levers] + ["star_fedavg", "centralized"]
    for c in cells:
        ax = axes[splits.index(c["split"])][families.index(c["family"])]
        for i, name in enumerate(names):
            s = c.get(name)
            if s is None:
                continue
            curves = [r["curve"] for r in s["runs"]]
            worst = [r["worst_curve"] for r in s["runs"]]
            mean = [statistics.fmean(v for v in col if v is not None) for col in zip(*curves, strict=True)]
            low = [min(v for v in col if v is not None) for col in zip(*worst, strict=True)]
            rounds = range(1, len(mean) + 1)
            line_ = ax.plot(rounds, mean, label=name.removeprefix("gossip:"), color=f"C{i}")[0]
            if name.startswith("gossip:"):
                ax.plot(rounds, low, linestyle="--", linewidth=0.8, color=line_.get_color())
        ax.set_title(f"{c['family']}, {c['split']} ({c['peers']} peers)", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    handles: dict[str, Any] = {}  # every setting once, also those run only for some families (one legend)
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def patch(lever: Lever) -> Any:
    from contextlib import nullcontext

    if not lever.node:
        return nullcontext()
    from levers_proto import patched

    return patched(lever.node)


def combine(inputs: list[Path], out: Path, png: Path) -> int:
    docs = [json.loads(p.read_text()) for p in inputs]
    names = list(dict.fromkeys(n for d in docs for n in d["levers"]))
    levers = [LEVERS[n] for n in names]
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for c in (c for d in docs for c in d["cells"]):  # the same family and split from several runs: one cell
        merged.setdefault((c["family"], c["split"]), {}).update(c)
    cells = list(merged.values())
    doc = {**docs[0], "levers": names, "cells": cells, "complete": all(d.get("complete") for d in docs),
           "seconds": sum(d["seconds"] for d in docs), "combined_from": [str(p) for p in inputs]}
    atomic_write_bytes(out, (json.dumps(doc, indent=1) + "\n").encode())
    plot(cells, levers, png)
    print(table(cells, levers))
    print(f"wrote {out} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 12 rounds")
    ap.add_argument("--families", default=",".join(list(FAMILIES)[:3]),
                    help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of " + ",".join(SPLITS))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--rounds", type=int, default=None, help="training rounds (default 20; --quick: 12)")
    ap.add_argument("--from-round", type=int, default=10, help="first round the anytime numbers cover")
    ap.add_argument("--lever", default="defaults", help="comma-separated gossip settings: " + ",".join(LEVERS))
    ap.add_argument("--no-baselines", action="store_true", help="skip star FedAvg and centralized training")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                    help="no runs: print the table and draw the plot of earlier runs' JSON files, write them as one "
                         "(a later file's settings win for the same family and split)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "learning.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "learning_curves.png",
                    help="accuracy curves per family and split (PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("quinkgl").setLevel(logging.ERROR)
    if args.combine:
        return combine(args.combine, args.json, args.plot)
    families = [f for f in args.families.split(",") if f]
    splits = [s for s in args.splits.split(",") if s]
    levers = [LEVERS[name] for name in args.lever.split(",") if name]
    for f in families:
        if f not in FAMILIES:
            raise SystemExit(f"unknown family {f!r}; known: {', '.join(FAMILIES)}")
    for s in splits:
        if s not in SPLITS:
            raise SystemExit(f"unknown split {s!r}; known: {', '.join(SPLITS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds or (12 if args.quick else 20)
    started = time.perf_counter()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    cells: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    for f in families:
        for s in splits:
            cells.append(cell(f, s, seeds, rounds, args.from_round, levers, not args.no_baselines, patch))
            doc = {  # rewritten after every cell: a long run that is cut short keeps what it measured
                "benchmark": "learning", "quick": args.quick, "rounds": rounds, "from_round": args.from_round,
                "seeds": seeds, "levers": [lv.name for lv in levers], "goal": GOAL, "cells": cells,
                "complete": len(cells) == len(families) * len(splits), "seconds": time.perf_counter() - started,
                "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            }
            atomic_write_bytes(args.json, (json.dumps(doc, indent=1) + "\n").encode())
    plot(cells, levers, args.plot)
    print(table(cells, levers))
    print(f"wrote {args.json} and {args.plot} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
