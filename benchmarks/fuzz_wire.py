"""Fuzz the tensor container decoder: a million seeded hostile blobs, and how many escaped as anything but WireError.

    python benchmarks/fuzz_wire.py                 # 1,000,000 cases (about 4 minutes on one core)
    python benchmarks/fuzz_wire.py --quick         # 20,000 cases
    python benchmarks/fuzz_wire.py --cases N --seed S --json PATH

The cases come from tests/wire_fuzz.py (the same generator the test suite runs a few thousand of): valid updates
with flipped bytes, wrong lengths, truncation, hostile shapes, and headers rewritten with NaN/Infinity/1e400,
5000-digit integers and nesting thousands deep. Each is decoded as a node decodes an update (`wire.decode_full`
with the node's limits, then `wire.check_against`). Goal: 0 escapes, where an escape is any exception other than
WireError or a blob that decoded with a non-finite number in its meta. Prints one line per outcome and the escape
count; exits 1 when there was any escape. Writes JSON (default benchmarks/results/fuzz_wire.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is a package at the repository root

from tests.wire_fuzz import ESCAPE_FREE, make_case, run_case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=None, help="number of cases (default 1,000,000; 20,000 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/fuzz_wire.json"))
    args = ap.parse_args()
    cases = args.cases if args.cases is not None else (20_000 if args.quick else 1_000_000)

    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    start = time.perf_counter()
    for _ in range(cases):
        outcomes[run_case(make_case(rng))] += 1
    seconds = time.perf_counter() - start
    escapes = sum(n for outcome, n in outcomes.items() if outcome not in ESCAPE_FREE)
    for outcome, n in outcomes.most_common():
        print(f"{outcome:24s} {n}")
    print(f"cases={cases} seed={args.seed} escapes={escapes} seconds={seconds:.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"headline": {"cases": cases, "escapes": escapes, "goal_met": escapes == 0},
              "outcomes": dict(outcomes), "seed": args.seed, "seconds": round(seconds, 1)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
