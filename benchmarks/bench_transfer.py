"""Model transfer speed: the IPv8 transport between processes vs a plain TCP socket pair, on loopback.

    python benchmarks/bench_transfer.py [--quick] [--json PATH]

For each size, the time runs from the sender's `send_model` call (payload already in memory) to the receiver's
`on_model` (bytes fetched into a fresh buffer and sha256-checked against the signed offer). The raw TCP baseline
moves the same bytes between two processes into a fresh buffer, with nothing checked. Both clocks are
CLOCK_MONOTONIC (time.perf_counter), shared by all processes of the machine. Also: three senders into one receiver.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1_000_000
SWARM = "sha256:" + "be" * 32


# -- the raw TCP pair -------------------------------------------------------------------------------------------------
def raw_recv(port_out: Any) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (size,) = struct.unpack("<Q", head)
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = conn.recv_into(view[got:])
            if n == 0:
                break
            got += n
        t1 = time.perf_counter()
        conn.close()
        print(json.dumps({"t": t1, "got": got}), flush=True)


def raw_send(port: int, size: int) -> None:
    from quinkgl_cli.transport.probe import payload_for

    payload = payload_for(size, 1)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("<Q", size))
    s.sendall(payload)
    s.close()
    print(json.dumps({"t": t0}), flush=True)


def raw_transfer(size: int) -> float:
    rx = subprocess.Popen([sys.executable, __file__, "--raw-role", "recv"], stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    port = int(rx.stdout.readline())
    tx = subprocess.Popen([sys.executable, __file__, "--raw-role", "send", "--raw-port", str(port), "--raw-size", str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert tx.stdout is not None and tx.stdin is not None
    assert tx.stdout.readline().strip() == "ready"
    tx.stdin.write("go\n")
    tx.stdin.flush()
    t0 = json.loads(tx.stdout.readline())["t"]
    done = json.loads(rx.stdout.readline())
    tx.wait(10)
    rx.kill()
    rx.wait()
    assert done["got"] == size
    return done["t"] - t0


# -- transport peers ------------------------------------------------------------------------------------------------
class Peer:
    def __init__(self, tmp: Path, node_id: str, bootstrap: tuple[str, int] | None = None) -> None:
        cmd = [sys.executable, "-m", "quinkgl_cli.transport.probe", "--node-id", node_id, "--swarm", SWARM, "--state-dir", str(tmp / node_id), "--fetch-timeout", "30", "--log-level", "WARNING"]
        if bootstrap:
            cmd += ["--bootstrap", f"{bootstrap[0]}:{bootstrap[1]}"]
        self.node_id = node_id
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.wait(lambda e: e["event"] in ("ready", "fatal"))
        if ready["event"] != "ready":
            raise RuntimeError(f"{node_id} failed to start: {ready}")
        self.address = tuple(ready["address"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, pred: Any, timeout: float = 60.0, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events[start:]:
                    if pred(e):
                        return e
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.node_id}: timed out; last events {self.events[-5:]}")
                self.cond.wait(0.2)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def count(self, kind: str) -> int:
        with self.cond:
            return sum(1 for e in self.events if e["event"] == kind)

    def stop(self) -> None:
        try:
            self.send({"cmd": "stop"})
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def meet(peers: list[Peer], timeout: float = 30.0) -> None:
    for p in peers:
        others = {q.node_id for q in peers if q is not p}
        deadline = time.monotonic() + timeout
        while True:
            with p.cond:
                found = {e["peer"] for e in p.events if e["event"] == "discovered"}
            if others <= found:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.node_id} did not meet {others - found}")
            time.sleep(0.05)


def transport_transfer(sender: Peer, receiver: Peer, size: int, seed: int) -> float:
    start_rx = len(receiver.events)
    start_tx = len(sender.events)
    sender.send({"cmd": "send", "to": receiver.node_id, "size": size, "seed": seed, "round": seed})
    sent = sender.wait(lambda e: e["event"] == "sent", start=start_tx)
    got = receiver.wait(lambda e: e["event"] == "model" and e["round"] == seed, start=start_rx)
    if got["size"] != size:
        raise RuntimeError("size mismatch")
    return got["t"] - sent["t"]


def fan_in(tmp: Path, receiver: Peer, size: int, n: int = 3) -> dict[str, Any]:
    senders = [Peer(tmp, f"fan{i}", bootstrap=receiver.address) for i in range(n)]
    try:
        meet([receiver, *senders])
        start = len(receiver.events)
        marks = [len(s.events) for s in senders]
        for i, s in enumerate(senders):
            s.send({"cmd": "send", "to": receiver.node_id, "size": size, "seed": 100 + i, "round": 100 + i})
        sent = [s.wait(lambda e: e["event"] == "sent", start=m)["t"] for s, m in zip(senders, marks, strict=True)]
        got = [receiver.wait(lambda e, r=100 + i: e["event"] == "model" and e["round"] == r, start=start)["t"] for i in range(n)]
        wall = max(got) - min(sent)
        return {"senders": n, "mb_each": size / MB, "seconds": wall, "aggregate_mb_s": n * size / MB / wall, "per_transfer_s": [g - s for g, s in zip(got, sent, strict=True)]}
    finally:
        for s in senders:
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition per size (under ~30 s)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "transfer.json"))
    ap.add_argument("--sizes", default="1,10,50", help="MB, comma separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--raw-role", choices=["recv", "send"], help=argparse.SUPPRESS)
    ap.add_argument("--raw-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--raw-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_role == "recv":
        raw_recv(None)
        return 0
    if args.raw_role == "send":
        raw_send(args.raw_port, args.raw_size)
        return 0
    reps = 1 if args.quick else args.reps
    sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgl-bench-") as tmpdir:
        tmp = Path(tmpdir)
        receiver = Peer(tmp, "rx")
        sender = Peer(tmp, "tx", bootstrap=receiver.address)
        try:
            meet([receiver, sender])
            transport_transfer(sender, receiver, 100_000, 0)  # warm up both processes' code paths
            seed = 1
            for size in sizes:
                ours, raw = [], []
                for _ in range(reps):
                    ours.append(transport_transfer(sender, receiver, size, seed))
                    seed += 1
                    raw.append(raw_transfer(size))
                o, r = statistics.median(ours), statistics.median(raw)
                rows.append({"mb": size / MB, "transport_s": o, "transport_mb_s": size / MB / o, "raw_tcp_s": r, "raw_tcp_mb_s": size / MB / r, "ratio_to_raw": r / o, "reps": reps})
                print(f"{size / MB:6.0f} MB  transport {o * 1000:8.1f} ms {size / MB / o:8.0f} MB/s   raw TCP {r * 1000:7.1f} ms {size / MB / r:8.0f} MB/s   ratio {r / o:5.2f}", flush=True)
            fan = fan_in(tmp, receiver, sizes[-1] if not args.quick else min(sizes[-1], 10 * MB))
            print(f"fan-in: {fan['senders']} senders x {fan['mb_each']:.0f} MB into one receiver: {fan['seconds'] * 1000:.1f} ms, {fan['aggregate_mb_s']:.0f} MB/s aggregate", flush=True)
        finally:
            sender.stop()
            receiver.stop()
    big = max(rows, key=lambda r: r["mb"])
    tag = f"{big['mb']:g}mb"
    headline = {f"mb_s_{tag}": round(big["transport_mb_s"], 1), f"ratio_to_raw_{tag}": round(big["ratio_to_raw"], 3), "fan_in_mb_s": round(fan["aggregate_mb_s"], 1)}
    headline.update({f"mb_s_{r['mb']:g}mb": round(r["transport_mb_s"], 1) for r in rows if r is not big})
    result = {
        "benchmark": "transfer",
        "headline": headline,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "rows": rows,
        "fan_in": fan,
        "goal": "at 50 MB, transport goodput >= 1/3 of raw TCP",
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
