"""Daemon benchmark: start-up time to the first round, peak RSS per peer, per-round overhead beyond training.

A swarm of 3 real `quinkgl run` processes on loopback trains a ~1.1M-parameter MLP (64-1024-1024-10) on the digits
data. Rounds run back to back (a tiny --gossip-interval), so a round's wall time is the daemon's own cost:

    overhead per round = round duration - training time           (what the issue asks for)
    overhead excl. eval = round duration - training - evaluation   (the daemon's bookkeeping and exchange alone)

On a small machine the three peers compete for the CPU (each trains while the others exchange), which inflates
those wall-clock numbers; the benchmark therefore also times the node's own steps in one process with nothing
competing (share, transfer over the memory transport incl. digest checks, aggregate, end_round, checkpoint encode).

Baselines, measured the same way in fresh processes: `import torch` alone, and `import torch` + the same model +
the same data loaded + one optimizer step (what any process that trains this model pays; torch's first optimizer
step imports torch._dynamo, ~70 MB). Targets: first round within 2 s of launch, peak RSS within 80 MB
of the baseline, overhead under 50 ms per round.

    python benchmarks/bench_daemon.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quinkgl_cli.node import localswarm as ls  # noqa: E402
from quinkgl_cli.node.checkpoint import CheckpointStore  # noqa: E402

BIG_SCRIPT = '''
from torch import nn
from quinkgl_cli.peer_scripts.digits_peer_script import build_loaders, build_optimizer, on_round_end  # noqa: F401


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
'''

BASELINE = '''
import sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
t_import = time.perf_counter() - t0
if sys.argv[1] == "full":
    from pathlib import Path
    from quinkgl_cli.node.script import load_script
    script = load_script(Path(sys.argv[2]))
    model = script.build_model(None)
    train, val, _ = script.build_loaders(None, shard="0", num_shards="3", partition="shards:3")
    optimizer = script.build_optimizer(None, model)
    for x, y in train:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()  # any training process pays this once: torch imports torch._dynamo on the first step
        break
from quinkgl_cli.node.process import peak_rss_mb
print(t_import, time.perf_counter() - t0, peak_rss_mb())
'''


def baseline(kind: str, script: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BASELINE, kind, str(script)], capture_output=True, text=True, env=env,
                         check=True)
    wall = time.perf_counter() - started
    t_import, t_total, rss = (float(v) for v in out.stdout.split())
    return {"wall_s": wall, "import_torch_s": t_import, "work_s": t_total, "peak_rss_mb": rss}


def first_round_delays(peers: list[ls.PeerProcess], launched: float, timeout: float) -> dict[str, float]:
    """Launch -> first `first-round` log line, per peer (polled every 5 ms)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(peers) and time.monotonic() < deadline:
        for p in peers:
            if p.name not in seen and "first-round" in p.text():
                seen[p.name] = time.monotonic() - launched
        time.sleep(0.005)
    return seen


def node_costs(rounds: int) -> dict[str, float]:
    """The node's own per-round work without processes competing for the CPU: 3 nodes of the same model in this
    process over the memory transport, each step timed per node (median over rounds, milliseconds)."""
    from datetime import UTC, datetime

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from quinkgl_cli.manifest.schema import Manifest
    from quinkgl_cli.node.core import Node, NodeConfig
    from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

    torch.set_num_threads(1)
    h = "sha256:" + "0" * 64
    manifest = Manifest(name="bench", created_at=datetime.now(UTC), data_schema_hash=h,
                        task={"type": "classification", "input_shape": (64,), "output_shape": (10,), "label_type": "integer"},
                        model={"framework": "pytorch", "arch_hash": h}, aggregation={"name": "FedAvg"},
                        topology={"name": "FullTopology"})
    net = MemoryNetwork(auto_deliver=False)
    nodes = []
    for i in range(3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        data = DataLoader(TensorDataset(torch.randn(96, 64), torch.randint(0, 10, (96,))), batch_size=32)
        transport = MemoryTransport(net, f"p{i}", swarm_id="s", arch_hash=h)
        node = Node(NodeConfig(f"p{i}", rounds=rounds + 1), manifest, "s", model, data, data,
                    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), transport)
        transport.start_sync(node)
        nodes.append(node)
    net.deliver_all()
    from quinkgl_cli.node.checkpoint import CheckpointStore

    steps: dict[str, list[float]] = {k: [] for k in ("share", "transfer", "aggregate", "end_round", "checkpoint_encode")}
    for r in range(rounds + 1):
        for n in nodes:
            n.begin_round()
            n.train_round()
        timed: dict[str, float] = {}
        t0 = time.perf_counter()
        for n in nodes:
            n.share(0)
        timed["share"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        net.deliver_all()
        timed["transfer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in nodes:
            n.aggregate()
        timed["aggregate"] = time.perf_counter() - t0
        for n in nodes:
            n.evaluate()
        t0 = time.perf_counter()
        for n in nodes:
            n.end_round()
        timed["end_round"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in nodes:
            CheckpointStore.encode(n.state_dict())
        timed["checkpoint_encode"] = time.perf_counter() - t0
        if r:  # round 0 warms up
            for k, v in timed.items():
                steps[k].append(1000 * v / len(nodes))
    out = {k: statistics.median(v) for k, v in steps.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (finishes in about 30 s on an idle machine)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "daemon.json")
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args()
    rounds = 8 if args.quick else 30

    with tempfile.TemporaryDirectory(prefix="qgl-bench-daemon-") as tmp:
        work = Path(tmp)
        script = work / "big_peer_script.py"
        script.write_text(BIG_SCRIPT)
        manifest, _key, _pub, _swarm = ls.digits_manifest(work, name="bench-1m", training={"local_epochs": "1"}, script=script)
        env = ls.child_env(work / "home")
        bare = baseline("bare", script, env)
        full = baseline("full", script, env)

        # Start-up: one peer alone (no discovery wait), launch -> first round.
        lone_args = {"shard": "0", "num_shards": "3", "partition": "shards:3"}
        cmd = ls.run_command(manifest, script, "lone", ls.free_port(), 1, 0.01, [], work / "ck-lone", lone_args)
        launched = time.monotonic()
        log_path = work / "lone.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        lone = ls.PeerProcess("lone", 0, log_path, proc, lone_args)
        lone_first = first_round_delays([lone], launched, 120).get("lone")
        proc.wait(timeout=120)
        # The daemon's own figure, measured from its process's start (what a user sees in the log).
        reported = re.search(r"first-round seconds_since_start=([0-9.]+)", lone.text())
        lone_reported = float(reported.group(1)) if reported else None

        # The swarm: every peer starts at once; rounds back to back.
        launched = time.monotonic()
        peers = ls.start_swarm(work, manifest, args.peers, rounds, 0.01, "shards:3", script=script,
                               extra=["--log-level", "info"])
        try:
            swarm_first = first_round_delays(peers, launched, 180)
            codes = ls.wait_all(peers, timeout=600)
        finally:
            ls.stop_all(peers)
        if any(codes):
            for p in peers:
                print(p.text()[-3000:], file=sys.stderr)
            raise SystemExit(f"a peer failed: {codes}")

        per_peer = []
        for p in peers:
            text = p.text()
            rss = float(re.search(r"peak_rss_mb=([0-9.]+)", text).group(1))  # type: ignore[union-attr]
            ckpt_s = [float(v) for v in re.findall(r"checkpoint-saved .*seconds=([0-9.]+)", text)]
            _f, state = CheckpointStore(work / "ckpt" / p.name).latest()  # type: ignore[misc]
            hist = state.meta["history"][1:]  # round 1 includes one-off warm-up (allocator, torch._dynamo import)
            overhead = [h["duration"] - h["train_time"] for h in hist]
            overhead_ex_eval = [h["duration"] - h["train_time"] - h["eval_time"] for h in hist]
            per_peer.append({
                "peer": p.name,
                "first_round_s": swarm_first.get(p.name),
                "peak_rss_mb": rss,
                "rss_over_baseline_mb": rss - full["peak_rss_mb"],
                "train_s_median": statistics.median(h["train_time"] for h in hist),
                "eval_s_median": statistics.median(h["eval_time"] for h in hist),
                "round_s_median": statistics.median(h["duration"] for h in hist),
                "overhead_ms_median": 1000 * statistics.median(overhead),
                "overhead_ms_p90": 1000 * sorted(overhead)[int(0.9 * (len(overhead) - 1))],
                "overhead_ex_eval_ms_median": 1000 * statistics.median(overhead_ex_eval),
                "checkpoint_ms_median": 1000 * statistics.median(ckpt_s) if ckpt_s else None,
                "peers_aggregated_median": statistics.median(h["peers"] for h in hist),
                "val_accuracy_final": state.meta["history"][-1]["val_accuracy"],
            })

    costs = node_costs(5 if args.quick else 15)

    import torch

    params = 64 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    result = {
        "model_params": params,
        "peers": args.peers,
        "rounds": rounds,
        "torch": torch.__version__,
        "baseline_import_torch": bare,
        "baseline_torch_model_data": full,
        "lone_first_round_s": lone_first,
        "lone_first_round_reported_s": lone_reported,
        "per_peer": per_peer,
        "node_cost_ms_in_process": costs,
    }
    print(f"model: {params:,} parameters, {args.peers} peers, {rounds} rounds back to back")
    print(f"baseline: import torch {bare['wall_s']:.2f} s wall / {bare['peak_rss_mb']:.0f} MB; "
          f"+ model + data {full['wall_s']:.2f} s / {full['peak_rss_mb']:.0f} MB")
    print(f"start-up, lone peer: launch -> first round {lone_first:.2f} s (its log: seconds_since_start={lone_reported})"
          if lone_first else "lone peer: no first round")
    print("peer     first-round  peak-RSS  vs-baseline  train   eval   round  overhead(p50/p90)  excl.eval  ckpt")
    for r in per_peer:
        print(f"{r['peer']:<8} {r['first_round_s'] or float('nan'):>9.2f} s {r['peak_rss_mb']:>6.0f} MB {r['rss_over_baseline_mb']:>+8.0f} MB "
              f"{1000 * r['train_s_median']:>5.0f}ms {1000 * r['eval_s_median']:>4.0f}ms {1000 * r['round_s_median']:>5.0f}ms "
              f"{r['overhead_ms_median']:>7.1f}/{r['overhead_ms_p90']:<6.1f} ms {r['overhead_ex_eval_ms_median']:>7.1f} ms "
              f"{r['checkpoint_ms_median'] or 0:>5.1f}ms")
    print("node's own work per round, one process, no CPU contention (ms, median per node): "
          + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
