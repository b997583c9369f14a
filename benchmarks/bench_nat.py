"""Model transfers between peers behind NATs, in the NAT lab (Linux namespaces; needs root, iproute2, iptables).

    sudo python benchmarks/bench_nat.py [--bytes N] [--repeats N] [--relay-rate B] [--daemons] [--json PATH]
    sudo python benchmarks/bench_nat.py --learning [--seeds 0 1] [--rounds N] [--json PATH]
    sudo python benchmarks/bench_nat.py --udp-first N [--json PATH]

Five ways a 10 MB model can travel, measured in one lab run from the sender's `send_model` to the recipient's
verified `on_model` (transport probes, no torch): ``direct`` (public to public), ``direct_via_nat`` (a NATed
recipient fetching from a public sender), ``reverse`` (a NATed sender connecting out to a public recipient),
``relay`` (two peers behind port-restricted NATs, through a public peer running with ``--relay``) and ``udp`` (two
peers behind port-restricted NATs whose firewalls drop all TCP: over the punched UDP way). For each: the
first transfer (which includes finding the way: a direct attempt that times out), then the median of the repeats
over the remembered way, and its throughput as a ratio to ``direct``. The lab's virtual links have no latency or
bandwidth limit of their own: the ratios show what the extra hop and handshakes cost, not a WAN; the relay's
own bound (``--relay-rate``, 50 MB/s by default) caps the relayed figure unless raised (``--relay-rate``).

``--daemons`` also runs four real `quinkgl run` daemons with 11.4 MB models (benchmarks/scripts/digits_wide.py,
4 rounds, 3 s interval), once with three of them behind a port-restricted, a full-cone and a symmetric NAT (the
public seed relaying), once all public: for each peer, the seconds from its `started` line to its first
aggregated model (process start-up, which depends on the machine's load, is left out).

``--learning`` instead compares learning: six real daemons train digits (non-IID, ``shards:2``, 20 rounds 1 s apart)
in the lab, two public (the seed relaying) and four behind two NATs, two behind one port-restricted router and two
behind one symmetric router (a symmetric and a restricted peer meet only through the relay; two peers behind one
router too, as it does not hairpin), then the same six on loopback; for each split seed (0, 1, 2), the peers' mean
validation accuracy over the last 5 rounds (and the final one) in both, then the means over the seeds and their
difference (the aim: within 2 points). A single run's figure swings by several points (non-IID gossip), so the
comparison is over seeds. Written to ``nat_learning.json`` by default.

``--udp-first N`` instead runs the ``udp_daemons`` scenario N times (three daemons, two behind port-restricted NATs
whose firewalls drop all TCP, no relay: every model comes over UDP) and gives, for each peer, the seconds from its
`started` line to its first aggregated model, then the median over all peers and runs: what the first UDP
transfer of each pair costs (rounds 1 s apart, so the figure moves in steps of about a second). Written to
``nat_udp_first.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def scenario(name: str, env: dict[str, str]) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "natlab_scenarios.py"), name, str(out)],
                              capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return None
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def learning(seeds: list[int], rounds: int, out: Path) -> int:
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for label, nat in (("nat", "1"), ("loopback", "0")):
            run = scenario("learning", {**os.environ, "QGL_LAB_NAT": nat, "QGL_LAB_SEED": str(seed),
                                        "QGL_LAB_ROUNDS": str(rounds)})
            if run is None:
                return 1
            row[label] = {k: run[k] for k in ("mean_val_accuracy", "mean_val_accuracy_last")}
            row[label]["peers"] = {n: {k: p[k] for k in ("val_accuracy", "val_accuracy_by_round", "peers_met",
                                                         "aggregations", "paths")} for n, p in run["peers"].items()}
        for key in ("mean_val_accuracy", "mean_val_accuracy_last"):
            row[f"difference_points{key[17:]}"] = round(100 * (row["nat"][key] - row["loopback"][key]), 2)
        print(f"seed {seed}: mean val_accuracy over the last 5 rounds behind NATs {row['nat']['mean_val_accuracy_last']:.4f}, "
              f"on loopback {row['loopback']['mean_val_accuracy_last']:.4f} ({row['difference_points_last']:+.2f} points); "
              f"final {row['nat']['mean_val_accuracy']:.4f} against {row['loopback']['mean_val_accuracy']:.4f} "
              f"({row['difference_points']:+.2f})")
        runs.append(row)
    result: dict[str, Any] = {"rounds": rounds, "partition": "shards:2", "runs": runs}
    for key in ("mean_val_accuracy", "mean_val_accuracy_last"):
        means = {side: sum(r[side][key] for r in runs) / len(runs) for side in ("nat", "loopback")}
        result[f"{key}_over_seeds"] = {side: round(v, 4) for side, v in means.items()}
        result[f"difference_points{key[17:]}_over_seeds"] = round(100 * (means["nat"] - means["loopback"]), 2)
    gap = result["difference_points_last_over_seeds"]
    result["within_2_points"] = abs(gap) <= 2.0
    print(f"over {len(runs)} seeds, last 5 rounds: behind NATs {result['mean_val_accuracy_last_over_seeds']['nat']:.4f}, "
          f"on loopback {result['mean_val_accuracy_last_over_seeds']['loopback']:.4f}: {gap:+.2f} points, "
          f"{'within' if abs(gap) <= 2.0 else 'NOT within'} 2 points (final: "
          f"{result['difference_points_over_seeds']:+.2f}); per seed, see above: single runs differ by several points")
    _write(out, result)
    return 0


def udp_first(runs: int, out: Path) -> int:
    wall = time.monotonic()
    firsts: list[float] = []
    per_run: list[dict[str, float]] = []
    for _ in range(runs):
        run = scenario("udp_daemons", dict(os.environ))
        if run is None:
            return 1
        row = {name: round(p["first_aggregation_s"] - p["started_s"], 2) for name, p in sorted(run["peers"].items())}
        print(f"started -> first aggregation (s) {row}")
        per_run.append(row)
        firsts += row.values()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"runs": per_run, "median_s": round(statistics.median(firsts), 2), "range_s": [min(firsts), max(firsts)],
              "wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(f"over {runs} runs: median {result['median_s']} s, range {result['range_s']}; wall {result['wall_s']} s, "
          f"cpu {result['cpu_s']} s, load average {result['load_average']}")
    _write(out, result)
    return 0


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = path.with_suffix(".tmp")
    tmp_json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp_json.replace(path)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=10_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--relay-rate", type=int, default=None, help="the relay's bytes/s (default: the transport's, 50 MB/s)")
    p.add_argument("--daemons", action="store_true", help="also time real daemons to their first aggregation")
    p.add_argument("--learning", action="store_true", help="compare learning behind NATs with loopback instead")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data split seeds for --learning")
    p.add_argument("--rounds", type=int, default=20, help="rounds for --learning")
    p.add_argument("--udp-first", type=int, default=0, metavar="N",
                   help="instead time the first UDP transfers of real daemons (the udp_daemons scenario), N runs")
    p.add_argument("--json", type=Path, default=None, help="where to write (default benchmarks/results/nat.json, "
                   "nat_learning.json with --learning, nat_udp_first.json with --udp-first)")
    args = p.parse_args()
    results = ROOT / "benchmarks" / "results"
    sys.path.insert(0, str(ROOT / "tests"))
    import natlab

    reason = natlab.unavailable()
    if reason is not None:
        print(f"NAT lab unavailable: {reason}", file=sys.stderr)
        return 2
    if args.learning:
        return learning(args.seeds, args.rounds, args.json or results / "nat_learning.json")
    if args.udp_first:
        return udp_first(args.udp_first, args.json or results / "nat_udp_first.json")
    env = {**os.environ, "QGL_BENCH_BYTES": str(args.bytes), "QGL_BENCH_REPEATS": str(args.repeats)}
    if args.relay_rate:
        env["QGL_BENCH_RELAY_RATE"] = str(args.relay_rate)
    result = scenario("bench", env)
    if result is None:
        return 1
    print(f"{args.bytes / 1e6:g} MB models, {args.repeats} repeats, relay rate {result['relay_rate']}; "
          f"peers met {result['met_after_s']} s after start")
    print(f"{'way':16} {'path':12} {'first s':>8} {'median s':>9} {'MB/s':>7} {'vs direct':>9}")
    for name in ("direct", "direct_via_nat", "reverse", "relay", "udp"):
        r = result[name]
        print(f"{name:16} {r['path']:12} {r['first_s']:8.3f} {r['median_s']:9.4f} {r['mb_per_s']:7.1f} "
              f"{r.get('ratio_to_direct', 1.0):9.2f}")
    if args.daemons:
        result["daemons"] = {}
        for label, nat in (("nat", "1"), ("public", "0")):
            run = scenario("daemons_bench", {**os.environ, "QGL_LAB_NAT": nat})
            if run is None:
                return 1
            result["daemons"][label] = run["peers"]
            firsts = {name: round(p["first_aggregation_s"] - p["started_s"], 2) for name, p in run["peers"].items()
                      if p["first_aggregation_s"] is not None}
            print(f"daemons, {label:6}: started -> first aggregation (s) {firsts}; final val_accuracy "
                  f"{ {n: p['val_accuracy'] for n, p in run['peers'].items()} }")
    _write(args.json or results / "nat.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
