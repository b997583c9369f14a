"""Simulator scale (time, memory) and the learning table on 20 non-IID digits peers.

    python benchmarks/bench_sim.py            # scale 10/100/500 peers x 20 rounds; learning table, 3 seeds
    python benchmarks/bench_sim.py --quick    # scale 10/100 peers x 5 rounds; short learning table, 10 rounds

Scale: each run is N real nodes of the digits MLP (64-32-10) with the default manifest on an IID split; the
baseline, measured in the same run, is the bare training the nodes do (the same SGD steps on the same shards in a
plain torch loop, no node, no transport, no evaluation), so ``overhead_ratio`` = simulator time / bare training.
Goal: 100 peers x 20 rounds within 120 s on 2 cores; memory grows linearly with peers. Each size runs in a fresh
process (the process's earlier garbage would otherwise pass for this size's memory); memory is the resident set the
simulation added, build and run, per peer, and the slope between consecutive sizes (MB per added peer), which
cancels what the first peers pay once (imports, caches). Peer views are the simulator's default bound (the daemon's
IPv8 peer table, 256): 100 peers know each other fully, 500 peers each know 128..256 others.

Learning table: 20 peers, 2 label shards each (``shards:2``), 20 training rounds. Rows: centralized training (one
node with all data), local only, centralized FedAvg (all 20 and 10 of 20 clients per round), gossip with the
manifest defaults (FedAvg), gossip with the gossip-SCAFFOLD aggregator, gossip as the published package ran it (1 local epoch, fanout 3, no extra exchange), ring
gossip, and robust aggregators against 4 of 20 sign-flip attackers (FullTopology: the rules need enough updates
per aggregation), on the same non-IID split and on an IID split. Each row shows the accuracy the swarm ends with
(after the consensus phase where there is one) and after its last training round, the ratio of its final mean to
centralized training's, and the bytes sent in all and in the consensus phase.

The learning-quality goal is checked on the defaults row and written as ``goal`` (``goal_met``): at least 85% mean
and 80% worst-peer final accuracy with at most 3 model sends per peer per training round (the consensus phase is
allowed, counted apart). Writes JSON (default benchmarks/results/sim.json) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from simkit import RESULTS, digits_manifest, digits_script, pct, quiet, row

from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.sim.partition import partition_indices
from quinkgl_cli.sim.simulator import Overrides, SimConfig, simulate

SCALE_GOAL_S = 120.0
GOAL_CASE = "gossip, quinkgl defaults"
GOAL = {"min_mean_accuracy": 0.85, "min_worst_accuracy": 0.80, "max_sends_per_peer_per_round": 3.0}
CENTRALIZED_CASE = "centralized training (1 node, all data)"


def bare_training_seconds(script: PeerScript, peers: int, rounds: int, epochs: int, seed: int) -> float:
    """The same SGD work as the nodes, in a plain loop: the floor any simulator of this swarm pays."""
    train, _, _ = script.build_loaders(None)
    x, y = train.dataset.tensors
    parts = partition_indices(y.numpy(), peers, "iid", seed)
    batch = train.batch_size
    models = []
    for _ in range(peers):
        model = script.build_model(None)
        models.append((model, script.build_optimizer(None, model)))
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(rounds):
        for (model, opt), idx in zip(models, parts, strict=True):
            rows = torch.as_tensor(idx)
            for _ in range(epochs):
                order = rows[torch.randperm(len(rows), generator=g)]
                for s in range(0, len(order), batch):
                    b = order[s : s + batch]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x[b]), y[b]).backward()
                    opt.step()
    return time.perf_counter() - started


def scale_one(peers: int, rounds: int) -> dict[str, Any]:
    """One size of the scale table, measured in this (fresh) process."""
    script = digits_script()
    manifest = digits_manifest(script)
    result = simulate(script, manifest, SimConfig(peers=peers, rounds=rounds, partition="iid", seed=1))
    bare = bare_training_seconds(script, peers, rounds, manifest.training.local_epochs, seed=1)
    mem = result.memory
    total = result.timing["build_s"] + result.timing["run_s"]
    entry: dict[str, Any] = {
        "peers": peers, "rounds": rounds,
        "build_s": result.timing["build_s"], "run_s": result.timing["run_s"], "total_s": total,
        "seconds_per_round": result.timing["seconds_per_round"],
        "bare_training_s": bare, "overhead_ratio": result.timing["run_s"] / bare if bare > 0 else None,
        "rss_before_build_mb": mem["rss_before_build_mb"], "rss_after_build_mb": mem["rss_after_build_mb"],
        "rss_end_mb": mem["rss_end_mb"], "process_peak_rss_mb": mem["process_peak_rss_mb"],
        "build_mb": mem["rss_after_build_mb"] - mem["rss_before_build_mb"],
        "sim_mb": mem["rss_end_mb"] - mem["rss_before_build_mb"],
        "mb_per_peer": mem["per_peer_kb"] / 1024.0, "build_mb_per_peer": mem["per_peer_kb_build"] / 1024.0,
        "max_peers": mem["max_peers"], "known_peers_mean": mem["known_peers_mean"], "known_peers_max": mem["known_peers_max"],
        "final_mean_accuracy": result.final.mean_accuracy,
    }
    if peers == 100 and rounds == 20:
        entry["goal_s"] = SCALE_GOAL_S
        entry["meets_goal"] = total <= SCALE_GOAL_S
    return entry


def scale(sizes: list[int], rounds: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every size in its own process; the rows and the memory slope between consecutive sizes."""
    out = []
    for peers in sizes:
        proc = subprocess.run([sys.executable, __file__, "--scale-one", str(peers), str(rounds)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"scale run with {peers} peers failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        entry = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(entry)
        print(f"scale peers={peers} rounds={rounds} total_s={entry['total_s']:.1f} run_s={entry['run_s']:.1f} "
              f"bare_training_s={entry['bare_training_s']:.1f} sim_mb={entry['sim_mb']:.1f} "
              f"mb_per_peer={entry['mb_per_peer']:.3f} known_peers_mean={entry['known_peers_mean']:.0f}", flush=True)
    slopes = [
        {"from_peers": a["peers"], "to_peers": b["peers"],
         "mb_per_added_peer": (b["sim_mb"] - a["sim_mb"]) / (b["peers"] - a["peers"]),
         "build_mb_per_added_peer": (b["build_mb"] - a["build_mb"]) / (b["peers"] - a["peers"]),
         "memory_ratio": b["sim_mb"] / a["sim_mb"] if a["sim_mb"] > 0 else None,
         "peer_ratio": b["peers"] / a["peers"]}
        for a, b in itertools.pairwise(out)
    ]
    for sl in slopes:
        ratio = "-" if sl["memory_ratio"] is None else f"{sl['memory_ratio']:.1f}x"
        print(f"memory slope {sl['from_peers']}->{sl['to_peers']} peers: {sl['mb_per_added_peer']:.3f} MB per added peer "
              f"(build {sl['build_mb_per_added_peer']:.3f}); memory {ratio} for {sl['peer_ratio']:.0f}x the peers", flush=True)
    return out, slopes


def learning_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings) of every row; settings: mode, manifest kwargs, config kwargs."""
    attack = {"attackers": 4, "attack": "signflip"}
    full = {"topology": "FullTopology"}
    cases: list[tuple[str, dict[str, Any]]] = [
        (CENTRALIZED_CASE, {"mode": "local", "peers": 1, "partition": "iid"}),
        ("local training only", {"mode": "local"}),
        ("star FedAvg (server, 20 of 20 clients)", {"mode": "fedavg", "clients_per_round": 20}),
        ("centralized FedAvg (10 of 20 clients)", {"mode": "fedavg", "clients_per_round": 10}),
        (GOAL_CASE, {}),
        ("gossip, Scaffold, defaults otherwise", {"aggregation": "Scaffold"}),
        ("gossip, Scaffold, fanout 2", {"aggregation": "Scaffold", "topology_params": {"fanout": 2}}),
        ("gossip, 1 epoch, fanout 3, no consensus", {"training": {"local_epochs": 1, "final_consensus_steps": 0}}),
        ("ring gossip (fanout 2), defaults otherwise", {"topology": "RingTopology", "topology_params": {"fanout": 2}}),
        ("FedAvg, 4/20 signflip attackers, full", {**full, **attack}),
        ("Krum, 4/20 signflip attackers, full", {"aggregation": "Krum", **full, **attack, "byzantine_f": 4}),
        ("TrimmedMean, 4/20 signflip attackers, full", {"aggregation": "TrimmedMean", **full, **attack, "byzantine_f": 4}),
        ("Median, 4/20 signflip attackers, full", {"aggregation": "Median", **full, **attack, "byzantine_f": 4}),
        ("MultiKrum, 4/20 signflip attackers, full", {"aggregation": "MultiKrum", **full, **attack, "byzantine_f": 4}),
    ]
    iid = {"partition": "iid", **full, **attack}
    cases += [
        (f"{agg}, 4/20 signflip attackers, full, iid split", {"aggregation": agg, **iid, "byzantine_f": 4})
        for agg in ("FedAvg", "Krum", "TrimmedMean", "Median")
    ]
    if quick:
        keep = {CENTRALIZED_CASE, "local training only", "star FedAvg (server, 20 of 20 clients)", GOAL_CASE,
                "gossip, Scaffold, defaults otherwise", "TrimmedMean, 4/20 signflip attackers, full"}
        cases = [c for c in cases if c[0] in keep]
    return cases


def learning(script: PeerScript, rounds: int, seeds: list[int], quick: bool) -> list[dict[str, Any]]:
    out = []
    for label, case in learning_cases(quick):
        manifest = digits_manifest(script, case.get("aggregation", "FedAvg"), case.get("topology", "RandomTopology"),
                                   training=case.get("training"), topology_params=case.get("topology_params"))
        runs = []
        for seed in seeds:
            cfg = SimConfig(
                peers=case.get("peers", 20), rounds=rounds, partition=case.get("partition", "shards:2"), seed=seed,
                mode=case.get("mode", "gossip"), clients_per_round=case.get("clients_per_round", 10),
                attackers=case.get("attackers", 0), attack=case.get("attack", "signflip"),
                overrides=Overrides(byzantine_f=case.get("byzantine_f")),
            )
            runs.append(row(simulate(script, manifest, cfg)))
        entry: dict[str, Any] = {
            "case": label,
            "mode": case.get("mode", "gossip"),
            "aggregation": manifest.aggregation.name if case.get("mode", "gossip") == "gossip" else None,
            "topology": manifest.topology.name if case.get("mode", "gossip") == "gossip" else None,
            "training": manifest.training.model_dump(),
            "seeds": seeds,
            "final_mean_accuracy": statistics.fmean(r["final_mean_accuracy"] for r in runs),
            "final_min_accuracy": min(r["final_min_accuracy"] for r in runs),
            "final_mean_by_seed": [r["final_mean_accuracy"] for r in runs],
            "final_min_by_seed": [r["final_min_accuracy"] for r in runs],
            "last_round_mean_accuracy": statistics.fmean(r["last_round_mean_accuracy"] for r in runs),
            "last_round_min_accuracy": min(r["last_round_min_accuracy"] for r in runs),
            "sends_per_peer_per_round": runs[0]["sends_per_peer_per_round"],
            "consensus_sends_per_peer": runs[0]["consensus_sends_per_peer"],
            "mb_sent": statistics.fmean(r["mb_sent"] for r in runs),
            "consensus_mb_sent": statistics.fmean(r["consensus_mb_sent"] for r in runs),
            "curve_seed0": runs[0]["curve"],
            "min_curve_seed0": runs[0]["min_curve"],
            "consensus_seed0": runs[0]["consensus_mean"],
            "run_s": statistics.fmean(r["run_s"] for r in runs),
        }
        out.append(entry)
        print(f"learning case={label!r} mean={pct(entry['final_mean_accuracy'])} worst={pct(entry['final_min_accuracy'])} "
              f"last_round={pct(entry['last_round_mean_accuracy'])}/{pct(entry['last_round_min_accuracy'])} "
              f"sends/peer/round={entry['sends_per_peer_per_round']:.2f} consensus_sends/peer={entry['consensus_sends_per_peer']:.1f} "
              f"MB={entry['mb_sent']:.1f} consensus_MB={entry['consensus_mb_sent']:.1f}", flush=True)
    central = next((r["final_mean_accuracy"] for r in out if r["case"] == CENTRALIZED_CASE), None)
    for r in out:
        r["ratio_to_centralized"] = r["final_mean_accuracy"] / central if central else None
    return out


def goal_check(learn_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The learning-quality goal on the defaults row: every criterion, its value, and whether all hold."""
    row_ = next((r for r in learn_rows if r["case"] == GOAL_CASE), None)
    if row_ is None:
        return None
    checks = {
        "mean_accuracy": (row_["final_mean_accuracy"], row_["final_mean_accuracy"] >= GOAL["min_mean_accuracy"]),
        "worst_accuracy": (row_["final_min_accuracy"], row_["final_min_accuracy"] >= GOAL["min_worst_accuracy"]),
        "sends_per_peer_per_round": (row_["sends_per_peer_per_round"],
                                     row_["sends_per_peer_per_round"] <= GOAL["max_sends_per_peer_per_round"]),
    }
    return {
        "case": GOAL_CASE, "thresholds": GOAL, "seeds": row_["seeds"], "rounds": len(row_["curve_seed0"]),
        "values": {k: v for k, (v, _) in checks.items()}, "met": {k: ok for k, (_, ok) in checks.items()},
        "consensus_sends_per_peer": row_["consensus_sends_per_peer"],
        "goal_met": all(ok for _, ok in checks.values()),
    }


def plot_learning(learn_rows: list[dict[str, Any]], path: Path, rounds: int) -> None:
    """Mean accuracy per round of the attack-free rows (first seed); a star marks the value after final consensus."""
    from quinkgl_cli.sim.report import Curve, plot_curves

    curves = [
        Curve(label=r["case"], rounds=list(range(1, len(r["curve_seed0"]) + 1)), mean=r["curve_seed0"],
              final=r["consensus_seed0"])
        for r in learn_rows if "attackers" not in r["case"]
    ]
    plot_curves(curves, path, f"20 peers, shards:2 digits, {rounds} rounds (seed {learn_rows[0]['seeds'][0]})",
                ylabel="mean validation accuracy")


def markdown(scale_rows: list[dict[str, Any]], slopes: list[dict[str, Any]], learn_rows: list[dict[str, Any]],
             seeds: list[int], rounds: int) -> str:
    lines = [
        "| peers | rounds | total s | s/round | bare training s | overhead x | sim MB | MB/peer | known peers (mean) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scale_rows:
        lines.append(f"| {s['peers']} | {s['rounds']} | {s['total_s']:.1f} | {s['seconds_per_round']:.2f} | "
                     f"{s['bare_training_s']:.1f} | {s['overhead_ratio']:.1f} | {s['sim_mb']:.1f} | {s['mb_per_peer']:.3f} | "
                     f"{s['known_peers_mean']:.0f} |")
    if slopes:
        lines += ["", "Memory slope (resident set the simulation added, build and run):", ""]
        lines += [f"- {sl['from_peers']} -> {sl['to_peers']} peers: {sl['mb_per_added_peer']:.3f} MB per added peer"
                  + ("" if sl["memory_ratio"] is None else f", {sl['memory_ratio']:.1f}x the memory for {sl['peer_ratio']:.0f}x the peers")
                  for sl in slopes]
    lines += [
        "",
        f"20 peers, `shards:2` digits, {rounds} training rounds, mean over seeds {seeds} (worst peer: lowest over seeds):",
        "",
        "| setting | mean acc | worst peer | last round: mean / worst | x centralized | sends/peer/round | "
        "consensus sends/peer | MB sent | of which consensus MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in learn_rows:
        ratio = "-" if r.get("ratio_to_centralized") is None else f"{r['ratio_to_centralized']:.2f}"
        lines.append(f"| {r['case']} | {pct(r['final_mean_accuracy'])} | {pct(r['final_min_accuracy'])} | "
                     f"{pct(r['last_round_mean_accuracy'])} / {pct(r['last_round_min_accuracy'])} | {ratio} | "
                     f"{r['sends_per_peer_per_round']:.2f} | {r['consensus_sends_per_peer']:.1f} | {r['mb_sent']:.1f} | "
                     f"{r['consensus_mb_sent']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10/100 peers x 5 rounds, short learning table, one seed")
    ap.add_argument("--json", type=Path, default=RESULTS / "sim.json")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--scale-one", nargs=2, type=int, metavar=("PEERS", "ROUNDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(1)
    if args.scale_one:
        print(json.dumps(scale_one(*args.scale_one)))
        return
    script = digits_script()
    sizes, scale_rounds = ([10, 100], 5) if args.quick else ([10, 100, 500], 20)
    rounds = 10 if args.quick else 20
    seeds = [7] if args.quick else [7, 1, 2]
    started = time.perf_counter()
    scale_rows, slopes = ([], []) if args.skip_scale else scale(sizes, scale_rounds)
    learn_rows = [] if args.skip_learning else learning(script, rounds, seeds, args.quick)
    table = markdown(scale_rows, slopes, learn_rows, seeds, rounds)
    goal = goal_check(learn_rows)
    if goal is not None:
        table += (f"\n\nGoal ({GOAL_CASE}, {goal['rounds']} rounds, seeds {goal['seeds']}): mean >= "
                  f"{pct(GOAL['min_mean_accuracy'])}, worst >= {pct(GOAL['min_worst_accuracy'])}, <= "
                  f"{GOAL['max_sends_per_peer_per_round']:g} sends per peer per training round: "
                  f"{'met' if goal['goal_met'] else 'NOT met'} (mean {pct(goal['values']['mean_accuracy'])}, worst "
                  f"{pct(goal['values']['worst_accuracy'])}, {goal['values']['sends_per_peer_per_round']:.2f} sends, plus "
                  f"{goal['consensus_sends_per_peer']:.1f} consensus sends per peer)")
    if learn_rows:
        plot_dir = args.json.parent
        plot_dir.mkdir(parents=True, exist_ok=True)
        plot_learning(learn_rows, plot_dir / "learning_curves.png", rounds)
        print(f"wrote {plot_dir / 'learning_curves.png'}")
    print(table)
    headline: dict[str, Any] = {}
    for s in scale_rows:
        headline[f"total_s_{s['peers']}_peers_{s['rounds']}_rounds"] = round(s["total_s"], 2)
        headline[f"mb_per_peer_{s['peers']}_peers"] = round(s["mb_per_peer"], 4)
    for sl in slopes:
        headline[f"mb_per_added_peer_{sl['from_peers']}_to_{sl['to_peers']}"] = round(sl["mb_per_added_peer"], 4)
    for r in learn_rows:
        keys = {"gossip, quinkgl defaults": "gossip_defaults", "star FedAvg (server, 20 of 20 clients)": "star_fedavg",
                "gossip, Scaffold, defaults otherwise": "gossip_scaffold"}
        if r["case"] in keys:
            key = keys[r["case"]]
            headline[f"{key}_mean_acc"] = round(r["final_mean_accuracy"], 4)
            headline[f"{key}_worst_acc"] = round(r["final_min_accuracy"], 4)
            if r.get("ratio_to_centralized") is not None:
                headline[f"{key}_ratio_to_centralized"] = round(r["ratio_to_centralized"], 4)
    data = {
        "benchmark": "sim",
        "headline": headline,
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "scale": scale_rows,
        "memory_slope": slopes,
        "learning": learn_rows,
        "goal": goal,
        "markdown": table,
        "seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)  # also with --skip-learning (no plot made it)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
