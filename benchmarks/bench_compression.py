"""Encode / decode throughput and bytes on the wire of the update codec, per compression setting.

The model is a flat float32 vector (10M parameters; 1M with --quick) shaped like trained weights; each round
moves it by a small update with per-layer scales. Timings are of the steady state (a delta against what the
receiver holds, error feedback included), the median of several rounds, against a plain memory copy of the same
vector in the same run. Throughput is model megabytes (4 bytes per parameter) per second.

    python benchmarks/bench_compression.py [--quick] [--params N] [--threads T] [--json PATH]
    python benchmarks/bench_compression.py --sim [--quick]    # accuracy table on the simulator

``--sim``: 20 peers with two digit classes each (``shards:2``), 20 rounds (10 with --quick), the manifest
defaults of the digits script, in gossip and in star-FedAvg mode (a server and all 20 clients each round), each
uncompressed and with top-k 10% / 1%, with and without error feedback. Writes benchmarks/results/compression_sim.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.strategies.compression import UpdateCodec
from quinkgl_cli.transport import wire

SETTINGS: dict[str, dict[str, Any]] = {
    "delta f32": {},
    "top-k 10%": {"top_k_ratio": 0.1},
    "top-k 1%": {"top_k_ratio": 0.01},
    "int8": {"quantize_bits": 8},
    "int16": {"quantize_bits": 16},
    "qsgd 15 levels": {"qsgd_levels": 15},
    "top-k 10% + int8": {"top_k_ratio": 0.1, "quantize_bits": 8},
    "top-k 1% + int8": {"top_k_ratio": 0.01, "quantize_bits": 8},
}


def model_like(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of layer-varying scale, and per-coordinate update scales (a few layers move much more)."""
    layers = 20
    scale = torch.logspace(-2.5, -0.5, layers)[torch.randint(0, layers, (layers,), generator=gen)]
    per = scale.repeat_interleave((n + layers - 1) // layers)[:n]
    return torch.randn(n, generator=gen) * per, per * 0.01


def timed(fn: Any, reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_setting(params: dict[str, Any], n: int, rounds: int, gen: torch.Generator) -> dict[str, Any]:
    spec = CompressionSpec(**params)
    sender, receiver = UpdateCodec(spec, n, seed=0), UpdateCodec(spec, n, seed=1)
    x, step = model_like(n, gen)
    receiver.receive("a", sender.encode("b", x).payload, 1 << 34)  # first contact: full weights
    enc_t, dec_t, sizes = [], [], []
    for _ in range(rounds):
        x = x + torch.randn(n, generator=gen) * step
        t0 = time.perf_counter()
        enc = sender.encode("b", x)
        t1 = time.perf_counter()
        receiver.receive("a", enc.payload, 1 << 34)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        sizes.append(enc.wire_bytes)
    model, _ = receiver.model_of("a")  # type: ignore[misc]
    mb = 4 * n / 1e6
    return {
        "params": params,
        "wire_bytes": int(statistics.median(sizes)),
        "ratio": round(4 * n / statistics.median(sizes), 2),
        "encode_mb_s": round(mb / statistics.median(enc_t), 1),
        "decode_mb_s": round(mb / statistics.median(dec_t), 1),
        "encode_ms": round(1000 * statistics.median(enc_t), 1),
        "decode_ms": round(1000 * statistics.median(dec_t), 1),
        "rel_error": float((model - x).norm() / (x.norm())),  # receiver's copy vs the sender's model
    }


SIM_SETTINGS: dict[str, dict[str, str]] = {
    "uncompressed": {},
    "top-k 10% + EF": {"top_k_ratio": "0.1"},
    "top-k 10%, no EF": {"top_k_ratio": "0.1", "error_feedback": "false"},
    "top-k 1% + EF": {"top_k_ratio": "0.01"},
    "top-k 1%, no EF": {"top_k_ratio": "0.01", "error_feedback": "false"},
    "top-k 1% + int8 + EF": {"top_k_ratio": "0.01", "quantize_bits": "8"},
}


def sim_table(quick: bool, path: Path) -> None:
    from simkit import digits_manifest, digits_script, quiet, row

    from quinkgl_cli.sim.simulator import Overrides, SimConfig, simulate

    quiet()
    script = digits_script()
    manifest = digits_manifest(script)
    rounds = 10 if quick else 20
    modes = {"gossip (manifest defaults)": {"mode": "gossip"}, "star FedAvg (20 of 20 clients)": {"mode": "fedavg", "clients_per_round": 20}}
    rows = []
    print(f"| setting | {' | '.join(modes)} | MB sent ({next(iter(modes))}) |")
    print("|---|" + "---|" * (len(modes) + 1))
    for label, params in SIM_SETTINGS.items():
        cells, mb = [], 0.0
        for mode_label, mode in modes.items():
            cfg = SimConfig(peers=20, rounds=rounds, partition="shards:2", seed=0,
                            overrides=Overrides(compression_params=params), **mode)  # type: ignore[arg-type]
            r = row(simulate(script, manifest, cfg))
            rows.append({"setting": label, "mode": mode_label, "compression_params": params, **r})
            cells.append(f"{100 * r['final_mean_accuracy']:.1f}%")
            mb = mb or r["mb_sent"]
        print(f"| {label} | {' | '.join(cells)} | {mb:.2f} |", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rounds": rounds, "peers": 20, "partition": "shards:2", "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M parameters, fewer settings and rounds (< 30 s)")
    ap.add_argument("--params", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: comparable runs)")
    ap.add_argument("--sim", action="store_true", help="accuracy table on the simulator instead of the codec timings")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    if args.sim:
        sim_table(args.quick, args.json or results / "compression_sim.json")
        return
    args.json = args.json or results / "compression.json"
    n = args.params or (1_000_000 if args.quick else 10_000_000)
    rounds = 2 if args.quick else 3
    gen = torch.Generator().manual_seed(0)
    x, _ = model_like(n, gen)
    mb = 4 * n / 1e6

    copy_s, _ = timed(lambda: x.clone(), 5)
    raw = x.numpy().tobytes()
    bytes_copy_s, _ = timed(lambda: bytearray(raw), 5)
    plain_enc_s, blob = timed(lambda: wire.encode({"w": x}), rounds)
    plain_dec_s, _ = timed(lambda: wire.decode(blob), rounds)
    rows: dict[str, Any] = {
        "memory copy (tensor clone)": {"encode_mb_s": round(mb / copy_s, 1), "wire_bytes": 4 * n, "ratio": 1.0},
        "memory copy (bytes)": {"encode_mb_s": round(mb / bytes_copy_s, 1), "wire_bytes": 4 * n, "ratio": 1.0},
        "none (plain container)": {"encode_mb_s": round(mb / plain_enc_s, 1), "decode_mb_s": round(mb / plain_dec_s, 1),
                                   "wire_bytes": len(blob), "ratio": round(4 * n / len(blob), 2)},
    }
    names = ["delta f32", "top-k 10%", "top-k 1%", "int8", "top-k 1% + int8"] if args.quick else list(SETTINGS)
    lossless = ["none", "zstd"] if args.quick else ["none", "zlib", "zstd"]
    for name in names:
        for algo in lossless:
            label = name if algo == "none" else f"{name} + {algo}"
            rows[label] = bench_setting({**SETTINGS[name], "lossless": algo}, n, rounds, gen)
    result = {"params": n, "threads": args.threads, "rounds": rounds, "torch": torch.__version__, "rows": rows}

    print(f"update codec, {n:,} parameters ({mb:.0f} MB float32), {args.threads} thread(s), median of {rounds}")
    print(f"{'setting':34} {'wire bytes':>12} {'ratio':>7} {'encode MB/s':>12} {'decode MB/s':>12} {'rel err':>9}")
    for label, row in rows.items():
        err = row.get("rel_error")
        print(f"{label:34} {row['wire_bytes']:>12,} {row['ratio']:>7} {row['encode_mb_s']:>12} "
              f"{row.get('decode_mb_s', ''):>12} {'' if err is None else f'{err:.2e}':>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
