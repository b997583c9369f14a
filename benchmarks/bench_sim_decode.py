"""What decoding a received model once for all its in-process recipients saves (`ModelReceived.shared`,
`Exchange._decoded`), measured against decoding it at every recipient, in one process on the same load.

    python benchmarks/bench_sim_decode.py --peers 1000 --rounds 20 --out benchmarks/results/sim_decode_1000x20.json

Two simulations of the same swarm (the workload of `bench_sim_phases.py`: the digits MLP on digits' training set
repeated 7 times, IID split, seed 1, the default manifest, one torch thread) are built, then run a round at a
time in turn, the order swapped every round, and the consensus phase the same way: ``once`` as the code runs,
``every`` with each recipient decoding the payload itself (the code before the slot). Alternating this finely,
both meet the same load on a shared machine, which separate runs minutes apart did not. Each round's CPU
(``time.process_time``) is recorded per simulation, and every peer's round metrics and final model are compared
between the two: they must be identical (exit 1 otherwise). Decodes are counted, and the CPU spent inside the decoding of received updates
(``decoding_cpu_s``, copies included, the whole run) is summed per simulation: the saving itself, which the load
blurs less than the rounds' totals. Each run appends its point
to ``--out``: single rounds swing by tens of percent on a loaded machine, so compare totals over several runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from simkit import RESULTS, digits_manifest, quiet
from threadpoolctl import threadpool_limits

from quinkgl_cli.node.core import evaluate_merged
from quinkgl_cli.node.exchange import Exchange, _Decoded
from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.heap import survivors_frozen
from quinkgl_cli.sim.simulator import ROUND_SECONDS, SimConfig, Simulator
from quinkgl_cli.transport.base import ModelReceived

TILED = Path(__file__).resolve().parent / "scripts" / "digits_tiled.py"
SHARED = Exchange._decoded
PAYLOAD = Exchange._decode_payload


class _Decoding:
    """Which way the simulation running now decodes (``once``: as the code does; ``every``: at every recipient),
    and how many updates each simulation decoded and how many payloads it decoded for them."""

    def __init__(self) -> None:
        self.name = "once"
        self.counts = {"once": {"received": 0, "decodes": 0}, "every": {"received": 0, "decodes": 0}}
        self.cpu = {"once": 0.0, "every": 0.0}  # inside the decoding of received updates, copies included

    def decoded(self, exchange: Exchange, msg: ModelReceived) -> _Decoded:
        self.counts[self.name]["received"] += 1
        start = time.process_time()
        try:
            return SHARED(exchange, msg) if self.name == "once" else exchange._decode_payload(msg.payload)
        finally:
            self.cpu[self.name] += time.process_time() - start

    def payload(self, exchange: Exchange, data: bytes | bytearray) -> _Decoded:
        self.counts[self.name]["decodes"] += 1
        return PAYLOAD(exchange, data)


def _round(sim: Simulator) -> None:
    """One training round as `Simulator._run` runs it (gossip mode)."""
    sim.clock.advance(ROUND_SECONDS)
    sim._gossip_round()
    for node in sim.nodes:
        node.evaluate()
        node.end_round()


def _consensus(sim: Simulator) -> None:
    steps = [node.begin_consensus() for node in sim.nodes][0]
    for step in steps:
        sim._exchange(sim.nodes, step)
    for node in sim.nodes:
        evaluate_merged(node)
        node.end_consensus()


def _digest(sim: Simulator) -> str:
    h = hashlib.sha256()
    for node in sim.nodes:
        h.update(json.dumps([{k: v for k, v in m.items() if k not in ("train_time", "eval_time")} for m in node.history],
                            sort_keys=True).encode())
        for name, t in node.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def measure(peers: int, rounds: int) -> dict[str, Any]:
    quiet()
    torch.set_num_threads(1)
    script = load_script(TILED)
    config = SimConfig(peers=peers, rounds=rounds, partition="iid", seed=1, script_args={"repeat": "7"})
    sims = {"once": Simulator(script, digits_manifest(script), config),
            "every": Simulator(script, digits_manifest(script), config)}
    decoding = _Decoding()
    for sim in sims.values():
        sim.build()
    cpu: dict[str, list[float]] = {name: [] for name in sims}
    phases: list[Callable[[Simulator], None]] = [_round] * rounds + [_consensus]
    Exchange._decoded = lambda self, msg: decoding.decoded(self, msg)  # type: ignore[method-assign]
    Exchange._decode_payload = lambda self, data: decoding.payload(self, data)  # type: ignore[method-assign]
    try:
        with threadpool_limits(limits=1, user_api="blas"), survivors_frozen():
            for i, phase in enumerate(phases):
                for name in (("once", "every") if i % 2 == 0 else ("every", "once")):
                    decoding.name = name
                    start = time.process_time()
                    phase(sims[name])
                    cpu[name].append(round(time.process_time() - start, 3))
    finally:
        Exchange._decoded = SHARED  # type: ignore[method-assign]
        Exchange._decode_payload = PAYLOAD  # type: ignore[method-assign]
    identical = _digest(sims["once"]) == _digest(sims["every"])
    rounds_cpu = {name: sum(c[:rounds]) for name, c in cpu.items()}
    saved = [e - o for o, e in zip(cpu["once"][:rounds], cpu["every"][:rounds], strict=True)]
    return {
        "peers": peers, "rounds": rounds, "identical": identical, "decode_counts": decoding.counts,
        "decoding_cpu_s": {name: round(v, 3) for name, v in decoding.cpu.items()},
        "round_cpu_s": {name: c[:rounds] for name, c in cpu.items()},
        "consensus_cpu_s": {name: c[rounds] for name, c in cpu.items()},
        "rounds_cpu_s": rounds_cpu,
        "rounds_saved_fraction": 1.0 - rounds_cpu["once"] / rounds_cpu["every"],
        "median_round_saved_s": statistics.median(saved),
        "consensus_saved_fraction": 1.0 - cpu["once"][rounds] / cpu["every"][rounds],
        "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "sim_decode.json")
    args = ap.parse_args()
    point = measure(args.peers, args.rounds)
    kept = json.loads(args.out.read_text())["points"] if args.out.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "points": [*kept, point]}, indent=1) + "\n")
    r = point["rounds_cpu_s"]
    print(f"peers={args.peers} rounds={args.rounds} rounds_cpu_s once={r['once']:.1f} every={r['every']:.1f} "
          f"saved={100 * point['rounds_saved_fraction']:.1f}% consensus_saved={100 * point['consensus_saved_fraction']:.1f}% "
          f"decodes once={point['decode_counts']['once']['decodes']} every={point['decode_counts']['every']['decodes']} "
          f"decoding_cpu_s once={point['decoding_cpu_s']['once']:.1f} every={point['decoding_cpu_s']['every']:.1f} "
          f"identical={point['identical']} load={point['load_average'][0]:.1f}", flush=True)
    if not point["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
