"""Whether a change to the simulator's speed left its results alone: every peer's metrics, every round, and the
model each peer holds at the end, for a few small simulations, written as JSON and compared with an earlier run's.

    python benchmarks/sim_identity.py --out /tmp/before.json                 # on the code before the change
    python benchmarks/sim_identity.py --against /tmp/before.json            # on the code after: exit 1 on a difference

Scenarios: 12 peers of the digits MLP on shards:2 and IID, FedAvg and TrimmedMean, 7 rounds (the spectral analysis
of round 5 included) and the consensus phase; 12 peers on shards:2 with AffinityTopology (which reads the peers'
fingerprints); 12 peers on shards:2 with Scaffold (extras on the wire), with MultiKrum against 2 sign-flipping
attackers, with FedRep and with APFL; 12 peers IID with local DP (epsilon 8) and with top-k compression; 200 peers
IID x 12 rounds with complete views; 200 peers x 12 rounds with views of at most 32 peers (each node sees a random
part of the swarm, as at 10,000 peers). Recorded per peer
and round: everything the node's round metrics hold (accuracy, loss, bytes, updates, the peers aggregated, the
spectral numbers) but the wall-clock durations; per peer at the end: the consensus phase's metrics and a SHA-256 of
its shared model's parameters and buffers. Wall time and CPU time per scenario are printed, not compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from simkit import digits_manifest, digits_script, quiet

from quinkgl_cli.sim.config import Overrides
from quinkgl_cli.sim.simulator import SimConfig, Simulator

WALL_CLOCK = ("train_time", "eval_time")  # what differs from run to run of the same code

SCENARIOS: dict[str, tuple[str, SimConfig]] = {  # (aggregation, config); AffinityTopology where the name says so
    "12-shards2-fedavg": ("FedAvg", SimConfig(peers=12, rounds=7, partition="shards:2", seed=3)),
    "12-iid-fedavg": ("FedAvg", SimConfig(peers=12, rounds=7, partition="iid", seed=3)),
    "12-shards2-trimmed": ("TrimmedMean", SimConfig(peers=12, rounds=7, partition="shards:2", seed=4)),
    "12-iid-trimmed": ("TrimmedMean", SimConfig(peers=12, rounds=7, partition="iid", seed=4)),
    "12-shards2-affinity": ("FedAvg", SimConfig(peers=12, rounds=7, partition="shards:2", seed=5)),
    # the paths that act on received updates: extras (Scaffold), a robust rule meeting attackers' updates,
    # personalization (a shared backbone, a mixed personal model), local DP, delta compression with error feedback
    "12-shards2-scaffold": ("Scaffold", SimConfig(peers=12, rounds=7, partition="shards:2", seed=6)),
    "12-shards2-multikrum-signflip": ("MultiKrum", SimConfig(peers=12, rounds=7, partition="shards:2", seed=7,
                                                             attackers=2, overrides=Overrides(byzantine_f=2))),
    "12-shards2-fedrep": ("FedAvg", SimConfig(peers=12, rounds=7, partition="shards:2", seed=8,
                                              overrides=Overrides(personalization="fedrep"))),
    "12-shards2-apfl": ("FedAvg", SimConfig(peers=12, rounds=7, partition="shards:2", seed=9,
                                            overrides=Overrides(personalization="apfl"))),
    "12-iid-dp": ("FedAvg", SimConfig(peers=12, rounds=7, partition="iid", seed=10, overrides=Overrides(dp_epsilon=8.0))),
    "12-iid-topk": ("FedAvg", SimConfig(peers=12, rounds=7, partition="iid", seed=11,
                                        overrides=Overrides(compression_params={"top_k_ratio": "0.1"}))),
    "200-iid-fedavg": ("FedAvg", SimConfig(peers=200, rounds=12, partition="iid", seed=1)),
    "200-iid-views32": ("FedAvg", SimConfig(peers=200, rounds=12, partition="iid", seed=2, max_peers=32)),
}


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in WALL_CLOCK}


def _model_digest(module: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record(name: str) -> dict[str, Any]:
    aggregation, config = SCENARIOS[name]
    script = digits_script()
    topology = "AffinityTopology" if name.endswith("affinity") else "RandomTopology"
    sim = Simulator(script, digits_manifest(script, aggregation=aggregation, topology=topology), config)
    wall, cpu = time.perf_counter(), time.process_time()
    result = sim.run()
    print(f"{name}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} CPU s", flush=True)
    consensus = {p.peer: vars(p) for p in result.consensus.peers} if result.consensus else {}
    return {
        "peers": {
            node.node_id: {
                "rounds": [_clean(m) for m in node.history],
                "consensus": consensus.get(node.node_id),
                "model_sha256": _model_digest(node.model),
            }
            for node in sim.nodes
        },
        "curve": [r.mean_accuracy for r in result.rounds],
        "final_mean_accuracy": result.final.mean_accuracy,
    }


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if len(out) >= 20:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k), b.get(k), f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the records here")
    ap.add_argument("--against", type=Path, help="compare with the records of this file (exit 1 on a difference)")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = ap.parse_args()
    quiet()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    records = {name: record(name) for name in names}
    text = json.dumps(records, sort_keys=True, indent=0) + "\n"
    print(f"sha256 of the records: {hashlib.sha256(text.encode()).hexdigest()}")
    if args.out is not None:
        args.out.write_text(text)
    if args.against is not None:
        earlier = json.loads(args.against.read_text())
        differences: list[str] = []
        for name in names:
            _diff(earlier.get(name), json.loads(json.dumps(records[name])), name, differences)
        same_text = json.dumps({n: earlier.get(n) for n in names}, sort_keys=True, indent=0) + "\n" == text
        print(f"byte-identical to {args.against}: {same_text}")
        for line in differences:
            print(f"  {line}")
        if differences or not same_text:
            sys.exit(1)


if __name__ == "__main__":
    main()
