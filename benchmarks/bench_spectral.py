"""The CPU time of one node's spectral analysis of the gossip graph it observed, as a simulated node runs it every
``spectral_every`` rounds (BLAS on one thread, as the simulator sets it).

    python benchmarks/bench_spectral.py                  # the code on the path
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_spectral.py --label other

The graph is shaped like a node's view at 10,000 peers: the node, the 60 peers it exchanged with over the window
(3 sends and 3 receptions a round, 10 rounds) and, for the 30 whose updates it aggregated, the 3 recipients each
update names; about 150 nodes, ids of 16 hex digits. Reports the least of ``--repeats`` timings of ``--calls``
analyses (milliseconds per analysis, the process clock) for `analyze_edges` and for `components`, and merges the
point into benchmarks/results/spectral_speed.json under ``--label`` (default: the module's commit, from git).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from quinkgl_cli.strategies import spectral

OUT = Path(__file__).resolve().parent / "results" / "spectral_speed.json"


def observed_graph(seed: int = 1) -> tuple[list[tuple[str, str]], list[str]]:
    rng = random.Random(seed)
    me = f"{rng.getrandbits(64):016x}"
    partners = [f"{rng.getrandbits(64):016x}" for _ in range(60)]
    edges = [(me, p) for p in partners]
    for sender in partners[:30]:
        edges += [(sender, f"{rng.getrandbits(64):016x}") for _ in range(3)]
    return edges, [me]


def best_ms(fn: Any, calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - start) / calls * 1e3)
    return min(times)


def _commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=where)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default=None)
    args = ap.parse_args()
    edges, nodes = observed_graph()
    with threadpool_limits(limits=1, user_api="blas"):
        report = spectral.analyze_edges(edges, nodes)
        point = {
            "module": spectral.__file__, "nodes": report.n, "edges": report.edges,
            "analyze_ms": best_ms(lambda: spectral.analyze_edges(edges, nodes), args.calls, args.repeats),
            "components_ms": best_ms(lambda: spectral.components(edges, nodes), args.calls, args.repeats),
            "fields": report.fields(), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
    label = args.label or _commit(Path(spectral.__file__).resolve().parent) or "unknown"
    kept = json.loads(OUT.read_text()) if OUT.exists() else {}
    kept[label] = point
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(kept, indent=1) + "\n")
    print(f"{label}: {point['nodes']} nodes, {point['edges']} edges: analyze_edges {point['analyze_ms']:.2f} ms, "
          f"components {point['components_ms']:.2f} ms, {point['fields']}")


if __name__ == "__main__":
    main()
