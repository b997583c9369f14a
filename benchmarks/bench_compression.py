"""Encode / decode throughput and bytes on the wire of the update codec, per compression setting, and what
compression costs in accuracy on the simulator.

    python benchmarks/bench_compression.py [--quick] [--params N] [--threads T] [--json PATH] [--skip-sim | --skip-codec]

Codec: the model is a flat float32 vector (10M parameters; 1M with --quick) shaped like trained weights; each
round moves it by a small update with per-layer scales. Timings are of the steady state (a delta against what the
receiver holds, error feedback included), the median of several rounds, against a plain memory copy of the same
vector in the same run (a tensor clone): ``encode_ratio_to_memcpy`` / ``decode_ratio_to_memcpy`` are each
setting's throughput over the copy's. Throughput is model megabytes (4 bytes per parameter) per second.

Simulator (``sim`` in the JSON): 20 peers with two digit classes each (``shards:2``), 20 rounds (10 with --quick),
the manifest defaults of the digits script, in star-FedAvg mode (a server and all 20 clients each round, the
setting of the issue's reference: 85.6% uncompressed, 79.6% top-k 1% + EF, 60.8% top-k 1% without EF) and in
gossip mode, each uncompressed and with top-k 10% / 1%, with and without error feedback (--quick: star FedAvg only,
uncompressed and top-k 1% with and without EF).

``headline``: the tensor-clone throughput, then per headline setting the encode and decode throughput as ratios to
it and the bytes on the wire, then the simulator's star-FedAvg accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from quinkgl_cli import wire
from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.strategies.compression import UpdateCodec

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


STAR = "star FedAvg (20 of 20 clients)"
GOSSIP = "gossip (manifest defaults)"
SIM_REFERENCE = {"uncompressed": 0.856, "top-k 1% + EF": 0.796, "top-k 1%, no EF": 0.608}  # the issue's star FedAvg
HEADLINE_SETTINGS = ("top-k 1%", "top-k 1% + int8", "int8", "delta f32")


def sim_table(quick: bool) -> dict[str, Any]:
    """Final accuracy and bytes per compression setting and mode; the markdown table under ``markdown``."""
    from simkit import digits_manifest, digits_script, pct, quiet, row

    from quinkgl_cli.sim.simulator import Overrides, SimConfig, simulate

    quiet()
    script = digits_script()
    manifest = digits_manifest(script)
    rounds = 10 if quick else 20
    modes: dict[str, dict[str, Any]] = {STAR: {"mode": "fedavg", "clients_per_round": 20}}
    settings = dict(SIM_SETTINGS)
    if quick:
        settings = {k: v for k, v in SIM_SETTINGS.items() if k in SIM_REFERENCE}
    else:
        modes[GOSSIP] = {"mode": "gossip"}
    rows = []
    for label, params in settings.items():
        for mode_label, mode in modes.items():
            cfg = SimConfig(peers=20, rounds=rounds, partition="shards:2", seed=0,
                            overrides=Overrides(compression_params=params), **mode)
            r = row(simulate(script, manifest, cfg))
            rows.append({"setting": label, "mode": mode_label, "compression_params": params,
                         "reference_accuracy": SIM_REFERENCE.get(label) if mode_label == STAR else None, **r})
            print(f"sim setting={label!r} mode={mode_label!r} final={pct(r['final_mean_accuracy'])} "
                  f"worst={pct(r['final_min_accuracy'])} MB={r['mb_sent']:.2f}", flush=True)
    lines = ["| setting | " + " | ".join(f"{m}: final | MB sent" for m in modes) + " | star reference |",
             "|---|" + "---:|---:|" * len(modes) + "---:|"]
    for label in settings:
        cells = []
        for m in modes:
            r = next(x for x in rows if x["setting"] == label and x["mode"] == m)
            cells += [pct(r["final_mean_accuracy"]), f"{r['mb_sent']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {pct(SIM_REFERENCE.get(label))} |")
    return {"rounds": rounds, "peers": 20, "partition": "shards:2", "seed": 0, "rows": rows, "markdown": "\n".join(lines)}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.replace("%", "pct").replace("+", "plus")).strip("_").replace("__", "_")


def headline_of(rows: dict[str, Any] | None, sim: dict[str, Any] | None) -> dict[str, float]:
    """Most telling first (a summary shows the first few): the copy's speed, top-k 1% against it and its bytes,
    the star-FedAvg accuracies the issue gives references for, then the other settings."""
    codec_part: list[tuple[str, float]] = []
    if rows is not None:
        codec_part.append(("memcpy_mb_s", rows["memory copy (tensor clone)"]["encode_mb_s"]))
        for label in HEADLINE_SETTINGS:
            if label in rows:
                key = slug(label)
                codec_part += [(f"{key}_encode_ratio_to_memcpy", rows[label]["encode_ratio_to_memcpy"]),
                               (f"{key}_decode_ratio_to_memcpy", rows[label]["decode_ratio_to_memcpy"]),
                               (f"{key}_wire_bytes", rows[label]["wire_bytes"])]
    star = [r for r in (sim or {}).get("rows", []) if r["mode"] == STAR]
    star.sort(key=lambda r: r["setting"] not in SIM_REFERENCE)
    sim_part = [(f"star_{slug(r['setting'])}_acc", round(r["final_mean_accuracy"], 4)) for r in star]
    n_ref = sum(1 for r in star if r["setting"] in SIM_REFERENCE)
    return dict(codec_part[:4] + sim_part[:n_ref] + codec_part[4:] + sim_part[n_ref:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M parameters, fewer settings and rounds (< 30 s)")
    ap.add_argument("--params", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: comparable runs)")
    ap.add_argument("--skip-sim", action="store_true", help="codec timings only")
    ap.add_argument("--skip-codec", action="store_true", help="simulator accuracy table only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.skip_sim and args.skip_codec:
        ap.error("--skip-sim and --skip-codec leave nothing to measure")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = Path(__file__).parent / "results"
    args.json = args.json or results / ("quick" if args.quick else "") / "compression.json"
    result: dict[str, Any] = {"benchmark": "compression", "quick": args.quick, "torch": torch.__version__}
    markdown: list[str] = []
    if not args.skip_codec:
        result.update(codec(args))
        markdown.append(result.pop("markdown"))
    sim = None if args.skip_sim else sim_table(args.quick)
    if sim is not None:
        result["sim"] = sim
        markdown.append(f"Simulator, {sim['peers']} peers, {sim['partition']} digits, {sim['rounds']} rounds:\n\n{sim['markdown']}")
    result["headline"] = headline_of(result.get("rows"), sim)
    result["markdown"] = "\n\n".join(markdown)
    result["seconds"] = time.perf_counter() - started
    result = {"headline": result.pop("headline"), **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    print(f"wrote {args.json}")


def codec(args: argparse.Namespace) -> dict[str, Any]:
    """Codec timings against a memory copy of the same vector, per setting; rows, settings and a markdown table."""
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
    copy_mb_s = rows["memory copy (tensor clone)"]["encode_mb_s"]
    for r in rows.values():
        r["encode_ratio_to_memcpy"] = round(r["encode_mb_s"] / copy_mb_s, 4)
        if "decode_mb_s" in r:
            r["decode_ratio_to_memcpy"] = round(r["decode_mb_s"] / copy_mb_s, 4)

    lines = [f"Update codec, {n:,} parameters ({mb:.0f} MB float32), {args.threads} thread(s), median of {rounds}; "
             "speeds also as ratios to the tensor clone's:", "",
             "| setting | wire bytes | compression x | encode MB/s | x memcpy | decode MB/s | x memcpy | rel error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        err = r.get("rel_error")
        lines.append(f"| {label} | {r['wire_bytes']:,} | {r['ratio']} | {r['encode_mb_s']} | {r['encode_ratio_to_memcpy']:.3f} | "
                     f"{r.get('decode_mb_s', '-')} | {format(r['decode_ratio_to_memcpy'], '.3f') if 'decode_ratio_to_memcpy' in r else '-'} | "
                     f"{'-' if err is None else f'{err:.2e}'} |")
    return {"params": n, "threads": args.threads, "rounds": rounds, "rows": rows, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    main()
