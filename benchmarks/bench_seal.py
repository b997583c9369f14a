"""What sealing every swarm datagram costs (`transport.ipv8.seal`), against the signature check each one gets anyway.

    python benchmarks/bench_seal.py [--messages N] [--repeat R] [--quick] [--json PATH]

1. Per datagram, at the sizes the swarm sends (an offer, a hello with its certificate, a full revocation list):
   microseconds to seal and to open, beside IPv8's Ed25519 signature check of the same bytes.
2. Between two real IPv8 transports on loopback, in one process: ``N`` control messages from one to the other
   (signed, sealed, opened, verified, replay-checked, handed to the node), sent in bursts of 20, each delivered
   before the next is sent; the rate is the messages delivered over the time from the first send to the last delivery (a datagram
   the receive buffer dropped is counted as lost, and waited for a second at most). With the seal as shipped and with it replaced by
   the identity (what the transport cost before), ``R`` times each, alternating which goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quinkgl_cli.transport.base import ModelReceived, PeerInfo  # noqa: E402
from quinkgl_cli.transport.ipv8 import seal as seal_module  # noqa: E402
from quinkgl_cli.transport.ipv8.seal import DatagramSeal  # noqa: E402

SIZES = {"offer": 300, "hello": 1400, "revocations": 38_000}
SWARM = "sha256:" + "5e" * 32
BURST = 20


def per_datagram(loops: int = 20_000) -> dict[str, Any]:
    from ipv8.keyvault.crypto import default_eccrypto

    seal = DatagramSeal(os.urandom(32))
    key = default_eccrypto.generate_key("curve25519")
    pub = key.pub()
    out: dict[str, Any] = {}
    for name, size in SIZES.items():
        packet = os.urandom(size)
        n = max(200, loops * 300 // size)
        t0 = time.perf_counter()
        for _ in range(n):
            sealed = seal.seal(packet)
        t1 = time.perf_counter()
        for _ in range(n):
            seal.open(sealed)
        t2 = time.perf_counter()
        signature = key.signature(packet)
        m = max(100, n // 10)
        for _ in range(m):
            pub.verify(signature, packet)
        t3 = time.perf_counter()
        out[name] = {"bytes": size, "seal_us": round((t1 - t0) / n * 1e6, 2), "open_us": round((t2 - t1) / n * 1e6, 2),
                     "verify_us": round((t3 - t2) / m * 1e6, 2)}
    return out


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.last = 0.0
        self.peers: set[str] = set()

    def on_peer_discovered(self, peer: PeerInfo) -> None:
        self.peers.add(peer.node_id)

    def on_peer_lost(self, peer: PeerInfo) -> None:
        self.peers.discard(peer.node_id)

    def on_model(self, update: ModelReceived) -> None:
        pass

    def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        self.messages += 1
        self.last = time.perf_counter()


async def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout}s")
        await asyncio.sleep(0.005)


async def delivery(messages: int, workdir: Path) -> tuple[float, int]:
    """Seconds from the first of ``messages`` control messages to the last delivered, and how many were delivered."""
    from quinkgl_cli.transport.ipv8 import IPv8Transport

    a = IPv8Transport("a", SWARM, "sha256:" + "0" * 64, workdir / "a", walk_interval=0.2)
    ra = Counter()
    await a.start(ra)
    b = IPv8Transport("b", SWARM, "sha256:" + "0" * 64, workdir / "b", bootstrap=[a.address], walk_interval=0.2)
    rb = Counter()
    await b.start(rb)
    try:
        await _wait(lambda: "b" in ra.peers and "a" in rb.peers, 20, "meeting")
        start = time.perf_counter()
        missing = 0  # datagrams a burst waited for in vain
        for i in range(messages):
            a.send_message("b", "bench", {"i": i})
            if i % BURST == BURST - 1:
                # asyncio reads one datagram per loop pass: unpaced, the sender fills the receive buffer and the
                # kernel drops the rest. Wait for the burst (a lost datagram: at most a second).
                deadline = time.perf_counter() + 1.0
                while rb.messages < i + 1 - missing and time.perf_counter() < deadline:
                    await asyncio.sleep(0)
                missing = i + 1 - rb.messages
        await asyncio.sleep(0.5)
        return rb.last - start, rb.messages
    finally:
        await b.stop()
        await a.stop()


def through_transports(messages: int, repeat: int) -> dict[str, Any]:
    sealed: list[float] = []  # messages delivered per second
    clear: list[float] = []
    lost = {"sealed": 0, "clear": 0}
    real_seal, real_open = DatagramSeal.seal, DatagramSeal.open
    for r in range(repeat):
        pair = (("sealed", sealed), ("clear", clear))
        for label, times in pair if r % 2 == 0 else pair[::-1]:  # alternate which goes first
            if label == "clear":
                seal_module.DatagramSeal.seal = lambda self, packet: packet  # type: ignore[method-assign]
                seal_module.DatagramSeal.open = lambda self, datagram: datagram  # type: ignore[method-assign]
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, delivered = asyncio.run(delivery(messages, Path(tmp)))
            finally:
                seal_module.DatagramSeal.seal, seal_module.DatagramSeal.open = real_seal, real_open  # type: ignore[method-assign]
            times.append(delivered / seconds)
            lost[label] += messages - delivered
            print(f"run {r + 1} {label}: {delivered}/{messages} messages in {seconds:.3f}s", file=sys.stderr)
    return {"messages": messages, "repeat": repeat, "lost": lost,
            "sealed_per_s": [round(t) for t in sealed], "clear_per_s": [round(t) for t in clear],
            "sealed_median_per_s": round(statistics.median(sealed)), "clear_median_per_s": round(statistics.median(clear))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="500 messages, once (run_all's --quick)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.messages, args.repeat = 500, 1
    datagrams = per_datagram(2000 if args.quick else 20_000)
    transports = through_transports(args.messages, args.repeat)
    hello = datagrams["hello"]
    result = {"headline": {"hello_seal_us": hello["seal_us"], "hello_open_us": hello["open_us"],
                           "hello_verify_us": hello["verify_us"], "sealed_per_s": transports["sealed_median_per_s"],
                           "clear_per_s": transports["clear_median_per_s"]},
              "per_datagram": datagrams, "transports": transports, "load_average": os.getloadavg()[0]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
