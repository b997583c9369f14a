"""UDP model transfers (`transport.ipv8.udpway`) under loss, in one process: the two ends of a transfer joined by
the in-memory network of `tests/test_udp_transfer.py`, which loses each datagram (chunks, acknowledgements, the
START, both ways) with the given probability and delivers the others at once. What it shows is the protocol's
recovery (fast retransmits, timeouts, the window), not a network's speed: there is no latency and no bandwidth
limit, and both ends share one core. The NAT lab measures real endpoints (`bench_nat.py`, case ``udp``).

    python benchmarks/bench_udp.py [--megabytes 2] [--losses 0 0.01 0.05] [--seeds 0 1 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quinkgl_cli.transport.ipv8 import udpwire  # noqa: E402
from tests.test_udp_transfer import Net, _transfer  # noqa: E402


async def one(size: int, loss: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        net = Net(seed=seed, loss=loss)
        started = time.monotonic()
        _a, _b, payload, (buf, _digest) = await _transfer(net, Path(tmp), size, stall_window=5.0)
        seconds = time.monotonic() - started
        assert bytes(buf) == payload
        sent = sum(1 for src, _dst, p in net.sent if p[:4] != udpwire.MAGIC)
        return {"seconds": round(seconds, 4), "chunks_sent": sent, "chunks": udpwire.chunks(size)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megabytes", type=float, default=2.0)
    p.add_argument("--losses", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "udp_loss.json")
    args = p.parse_args()
    size = int(args.megabytes * 1e6)
    result: dict[str, Any] = {"bytes": size, "runs": {}}
    for loss in args.losses:
        runs = [asyncio.run(one(size, loss, seed)) for seed in args.seeds]
        median = statistics.median(r["seconds"] for r in runs)
        result["runs"][str(loss)] = {"median_s": median, "mb_per_s": round(size / median / 1e6, 2), "runs": runs}
        resent = statistics.median(r["chunks_sent"] / r["chunks"] - 1 for r in runs)
        print(f"loss {loss:5.1%}: {size / 1e6:g} MB in {median:.3f} s median of {len(runs)} ({size / median / 1e6:.1f} MB/s), "
              f"{resent:.1%} of the chunks sent again")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_suffix(".tmp")
    tmp_json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp_json.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
