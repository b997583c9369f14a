"""Compressed updates: primitive round trips with their error bounds, the per-peer codec (mirror, conservation,
error feedback, resync, checkpoints) and refusal of malformed payloads."""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import pytest
import torch

from quinkgl_cli import wire
from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.strategies import compression as C
from quinkgl_cli.strategies.compression import StaleBase, UpdateCodec
from quinkgl_cli.wire import WireError

LIMIT = 10**8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ primitives
def test_topk_picks_largest_magnitudes_in_ascending_order() -> None:
    v = torch.randn(1000, generator=_gen())
    idx = C.topk_indices(v, 37)
    assert idx.numel() == 37 and bool((idx[1:] > idx[:-1]).all())
    threshold = v.abs()[idx].min()
    others = torch.ones(1000, dtype=torch.bool)
    others[idx] = False
    assert float(v.abs()[others].max()) <= float(threshold)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1003])
def test_bitmap_round_trip(n: int) -> None:
    idx = torch.sort(torch.randperm(n, generator=_gen(n))[: max(1, n // 3)]).values
    bits = C.pack_bitmap(idx, n)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(C.unpack_bitmap(bits, n), idx)


@pytest.mark.parametrize("bits,block", [(8, 256), (8, 64), (16, 256), (16, 1000)])
def test_blockwise_quantization_error_bound(bits: int, block: int) -> None:
    v = torch.randn(10_007, generator=_gen()) * torch.logspace(-3, 1, 10_007)  # blocks of very different scales
    q, scales = C.quantize_blockwise(v, bits, block)
    back = C.dequantize(q, scales, block)
    qmax = 127 if bits == 8 else 32767
    err = (back - v).abs()
    rows = C._blocks(v, block).abs().amax(dim=1)
    # Half a quantization step, plus float32 rounding of values up to the block's maximum.
    bound = (rows / qmax / 2 + rows * 2**-22).repeat_interleave(block)[: v.numel()]
    assert bool((err <= bound).all())
    assert q.dtype == (torch.int8 if bits == 8 else torch.int16)
    assert int(q.abs().max()) <= qmax


def test_blockwise_quantization_of_zeros_is_exact() -> None:
    q, scales = C.quantize_blockwise(torch.zeros(300), 8, 128)
    assert torch.equal(C.dequantize(q, scales, 128), torch.zeros(300))


@pytest.mark.parametrize("levels", [1, 4, 16, 300])
def test_qsgd_is_unbiased_and_within_its_variance_bound(levels: int) -> None:
    block = 64
    v = torch.randn(256, generator=_gen(1))
    gen = _gen(2)
    draws = 3000
    total = torch.zeros_like(v)
    sq_err = 0.0
    for _ in range(draws):
        q, norms = C.qsgd_quantize(v, levels, block, gen)
        back = C.dequantize(q, norms, block, float(levels))
        total += back
        sq_err += float(((back - v) ** 2).sum())
    mean = total / draws
    # Each coordinate's estimator has std <= norm/levels; the mean of `draws` draws is within 5 sigma.
    per_coord_std = (C._blocks(v, block).norm(dim=1) / levels).repeat_interleave(block)
    assert bool(((mean - v).abs() <= 5 * per_coord_std / math.sqrt(draws) + 1e-6).all())
    # QSGD (Alistarh et al. 2017, Lemma 3.1): E||Q(v)-v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 per bucket of d values.
    bound = min(block / levels**2, math.sqrt(block) / levels) * float((v**2).sum())
    assert sq_err / draws <= bound * 1.05
    assert q.dtype == (torch.int8 if levels <= 127 else torch.int16)


# ------------------------------------------------------------------------------------------ codec
SPECS = [
    CompressionSpec(),
    CompressionSpec(top_k_ratio=0.01),
    CompressionSpec(top_k_ratio=0.1),  # bitmap indices
    CompressionSpec(top_k_ratio=0.01, quantize_bits=8, lossless="zstd"),
    CompressionSpec(top_k_ratio=0.1, quantize_bits=16, lossless="zlib"),
    CompressionSpec(quantize_bits=8, block_size=64),
    CompressionSpec(qsgd_levels=15),
    CompressionSpec(qsgd_levels=1000, top_k_ratio=0.05),
    CompressionSpec(top_k_ratio=0.01, error_feedback=False),
    CompressionSpec(top_k_ratio=0.01, ef21_momentum=0.3),
    CompressionSpec(top_k_ratio=0.01, residual_norm_cap=0.5),
    CompressionSpec(delta=False, quantize_bits=8),
]


def _walk(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(n, generator=g)
    out = [x]
    for _ in range(steps):
        x = x + 0.05 * torch.randn(n, generator=g)
        out.append(x)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s.model_dump(exclude_defaults=True)))
def test_receiver_reconstruction_mirrors_sender_exactly(spec: CompressionSpec) -> None:
    n = 5003
    a, b = UpdateCodec(spec, n, seed=1), UpdateCodec(spec, n, seed=2)
    extras = {"c": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for t, x in enumerate(_walk(n, 6)):
        enc = a.encode("B", x, extras=extras, meta={"step": t})
        got = b.receive("A", enc.payload, LIMIT)
        assert got.meta == {"step": t} and got.kind == enc.kind
        assert enc.kind == ("full" if t == 0 or not spec.delta else "delta")
        model, ex = b.model_of("A")  # type: ignore[misc]
        assert torch.equal(ex["c"], torch.arange(6, dtype=torch.float32))
        if spec.delta:
            assert torch.equal(a._tx["B"].ref, model)  # bit-identical mirror: chains never drift apart
        if t == 0 and spec.delta:
            assert torch.equal(model, x)  # a chain starts from exact weights
    assert a.stats.bytes_wire_sent == b.stats.bytes_wire_received
    assert a.stats.bytes_raw_sent == 7 * 4 * n


def test_sparse_payload_is_smaller_than_dense() -> None:
    n = 100_000
    xs = _walk(n, 1)
    sizes = {}
    for name, spec in {"dense": CompressionSpec(lossless="zlib"), "top1": CompressionSpec(top_k_ratio=0.01),
                       "top1q": CompressionSpec(top_k_ratio=0.01, quantize_bits=8),
                       "top10": CompressionSpec(top_k_ratio=0.1), "int8": CompressionSpec(quantize_bits=8)}.items():
        codec = UpdateCodec(spec, n, seed=0)
        codec.encode("p", xs[0])
        sizes[name] = codec.encode("p", xs[1]).wire_bytes
    assert sizes["top1"] < 1000 * 8 + 2000  # 1,000 int32 index gaps + 1,000 float32 values + header
    assert sizes["top1q"] < 1000 * 5 + 2000
    assert sizes["top10"] < n // 8 + 10_000 * 4 + 2000  # bitmap beats int32 indices at 10%
    assert sizes["int8"] < n + n // 256 * 4 + 2000


def _sent_and_residual(spec: CompressionSpec, xs: list[torch.Tensor]) -> torch.Tensor:
    """Sum of every delta the codec sent after the first (full) send, plus its final residual."""
    n = xs[0].numel()
    codec = UpdateCodec(spec, n, seed=3)
    codec.encode("p", xs[0])
    sent = torch.zeros(n, dtype=torch.float64)
    for x in xs[1:]:
        enc = codec.encode("p", x)
        if enc.sent_indices is None:
            sent += enc.sent_values.double()
        else:
            sent[enc.sent_indices] += enc.sent_values.double()
    residual = codec.residual("p").double()  # type: ignore[union-attr]
    assert float(residual.norm()) > 0.1  # something really was held back
    return sent + residual


@pytest.mark.parametrize(
    "spec",
    [CompressionSpec(top_k_ratio=0.01), CompressionSpec(top_k_ratio=0.05, quantize_bits=8),
     CompressionSpec(qsgd_levels=7)],
    ids=lambda s: str(s.model_dump(exclude_defaults=True)),
)
def test_information_conservation_against_raw_deltas(spec: CompressionSpec) -> None:
    """Momentum off: over K sends, sum of what was sent + final residual == sum of the raw deltas x_k - x_(k-1)."""
    xs = _walk(4000, 25, seed=4)
    raw = sum((b.double() - a.double() for a, b in itertools.pairwise(xs)), torch.zeros(4000, dtype=torch.float64))
    torch.testing.assert_close(_sent_and_residual(spec, xs), raw, atol=1e-4, rtol=0)


def test_information_conservation_with_ef21_momentum_is_against_the_averaged_target() -> None:
    """EF21 momentum beta: what is conserved is the sum of the deltas of t_k = t_(k-1) + beta (x_k - t_(k-1)),
    t_0 = x_0 -- not the raw deltas (the momentum holds back part of each move)."""
    beta, xs = 0.4, _walk(4000, 25, seed=4)
    target = xs[0].double()
    for x in xs[1:]:
        target = target + beta * (x.double() - target)
    got = _sent_and_residual(CompressionSpec(top_k_ratio=0.02, ef21_momentum=beta), xs)
    torch.testing.assert_close(got, target - xs[0].double(), atol=1e-4, rtol=0)
    raw = xs[-1].double() - xs[0].double()
    assert float((got - raw).norm()) > 0.1


def test_residual_cap_bounds_the_residual_norm() -> None:
    codec = UpdateCodec(CompressionSpec(top_k_ratio=0.01, residual_norm_cap=0.25), 3000, seed=0)
    for x in _walk(3000, 10):
        enc = codec.encode("p", x)
        assert enc.residual_norm <= 0.25 + 1e-6
    assert float(codec.residual("p").norm()) <= 0.25 + 1e-5  # type: ignore[union-attr]


def test_without_error_feedback_nothing_is_held_back() -> None:
    codec = UpdateCodec(CompressionSpec(top_k_ratio=0.01, error_feedback=False), 3000, seed=0)
    for x in _walk(3000, 3):
        codec.encode("p", x)
    assert codec.residual("p") is None


def _least_squares(spec: CompressionSpec, rounds: int) -> list[float]:
    """Four workers take a local gradient step on their slice of a least-squares problem from the shared model
    and send it compressed to an averaging server, which sends the average back exactly."""
    d, m, workers, lr = 100, 50, 4, 1.0
    g = _gen(0)
    x_star = torch.randn(d, generator=g)
    A = [torch.randn(m, d, generator=g) / d**0.5 for _ in range(workers)]
    b = [a @ x_star for a in A]
    x = torch.zeros(d)
    senders = [UpdateCodec(spec, d, seed=i) for i in range(workers)]
    server = UpdateCodec(spec, d, seed=99)
    errors = []
    for _ in range(rounds):
        for i in range(workers):
            local = x - lr * A[i].T @ (A[i] @ x - b[i])
            server.receive(f"w{i}", senders[i].encode("server", local).payload, LIMIT)
        x = torch.stack([server.model_of(f"w{i}")[0] for i in range(workers)]).mean(0)  # type: ignore[index]
        errors.append(float((x - x_star).norm() / x_star.norm()))
    return errors


def test_error_feedback_makes_top1_percent_converge_where_plain_top_k_stalls() -> None:
    with_ef = _least_squares(CompressionSpec(top_k_ratio=0.01), 400)
    plain = _least_squares(CompressionSpec(top_k_ratio=0.01, error_feedback=False), 400)
    assert with_ef[-1] < 0.1 and with_ef[-1] < 0.6 * with_ef[199]  # still going down
    assert plain[-1] > 0.5 and plain[-1] > 0.95 * plain[199]  # stuck: the dropped coordinates are lost for good


# ------------------------------------------------------------------------------------------ resync and state
def test_lost_delta_is_refused_then_full_weights_restart_the_chain() -> None:
    spec = CompressionSpec(top_k_ratio=0.05, quantize_bits=8)
    n = 2000
    a, b = UpdateCodec(spec, n, seed=0), UpdateCodec(spec, n, seed=1)
    xs = _walk(n, 4)
    b.receive("A", a.encode("B", xs[0]).payload, LIMIT)
    a.encode("B", xs[1])  # lost on the way
    with pytest.raises(StaleBase):
        b.receive("A", a.encode("B", xs[2]).payload, LIMIT)
    assert b.stats.rejected == 1
    a.reset_peer("B")  # what the node does on a RESYNC_KIND message
    enc = a.encode("B", xs[3])
    assert enc.kind == "full"
    b.receive("A", enc.payload, LIMIT)
    assert torch.equal(b.model_of("A")[0], xs[3])  # type: ignore[index]
    assert a.stats.resyncs == 1


def test_delta_without_any_base_is_refused() -> None:
    a = UpdateCodec(CompressionSpec(top_k_ratio=0.1), 100, seed=0)
    a.encode("B", torch.zeros(100))
    with pytest.raises(StaleBase):
        UpdateCodec(CompressionSpec(top_k_ratio=0.1), 100).receive("A", a.encode("B", torch.ones(100)).payload, LIMIT)


def test_state_dict_round_trip_continues_the_chain() -> None:
    spec = CompressionSpec(top_k_ratio=0.02, residual_norm_cap=10.0)
    n = 1500
    a, b = UpdateCodec(spec, n, seed=0), UpdateCodec(spec, n, seed=1)
    xs = _walk(n, 4)
    for x in xs[:3]:
        b.receive("A", a.encode("B", x).payload, LIMIT)
    a2, b2 = UpdateCodec(spec, n, seed=5), UpdateCodec(spec, n, seed=6)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert {"tx/B/ref", "tx/B/ver", "tx/B/residual", "tx/B/last"} <= set(state_a)
    assert all(isinstance(t, torch.Tensor) for t in state_a.values())
    a2.load_state_dict(state_a)
    b2.load_state_dict(state_b)
    enc = a2.encode("B", xs[3])
    assert enc.kind == "delta"
    b2.receive("A", enc.payload, LIMIT)
    assert torch.equal(b2.model_of("A")[0], a2._tx["B"].ref)  # type: ignore[index]
    assert torch.equal(a2.residual("B"), a.residual("B") + (xs[3] - xs[2]) - (a2._tx["B"].ref - a._tx["B"].ref))  # type: ignore[operator]


def test_state_dict_refuses_foreign_state() -> None:
    a = UpdateCodec(CompressionSpec(top_k_ratio=0.1), 100, seed=0)
    a.encode("B", torch.zeros(100))
    with pytest.raises(ValueError, match="does not fit"):
        UpdateCodec(CompressionSpec(top_k_ratio=0.1), 101).load_state_dict(a.state_dict())
    bad = a.state_dict()
    bad["tx/B/ver"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="token"):
        UpdateCodec(CompressionSpec(top_k_ratio=0.1), 100).load_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected"):
        UpdateCodec(CompressionSpec(top_k_ratio=0.1), 100).load_state_dict({"weird": torch.zeros(1)})


def test_peer_state_is_bounded() -> None:
    codec = UpdateCodec(CompressionSpec(top_k_ratio=0.1), 10, max_peers=3, seed=0)
    for p in "abcd":
        codec.encode(p, torch.zeros(10))
    assert sorted(codec._tx) == ["b", "c", "d"]
    assert codec.encode("a", torch.zeros(10)).kind == "full"


def test_incoherent_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="delta"):
        CompressionSpec(top_k_ratio=0.1, delta=False)
    with pytest.raises(ValueError, match="one of"):
        CompressionSpec(quantize_bits=8, qsgd_levels=4)


# ------------------------------------------------------------------------------------------ malformed payloads
def _valid(spec: CompressionSpec, n: int = 1000) -> tuple[UpdateCodec, UpdateCodec, bytes]:
    """A receiver holding the sender's first model, and the sender's (valid) second payload."""
    a, b = UpdateCodec(spec, n, seed=0), UpdateCodec(spec, n, seed=1)
    xs = _walk(n, 1)
    b.receive("A", a.encode("B", xs[0]).payload, LIMIT)
    return a, b, a.encode("B", xs[1]).payload


def _tamper(payload: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    tensors, meta, enc = wire.decode_full(bytearray(payload))
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors, meta[C.META_KEY])
    return wire.encode(tensors, meta=meta, encoding=enc)


def _set(name: str, fn):  # type: ignore[no-untyped-def]
    def edit(t, m):  # type: ignore[no-untyped-def]
        t[name] = fn(t[name])
    return edit


def _meta(key: str, value):  # type: ignore[no-untyped-def]
    def edit(t, m):  # type: ignore[no-untyped-def]
        m[key] = value
    return edit


TOPK = CompressionSpec(top_k_ratio=0.01)  # int32 index gaps, float32 values
TOPKQ = CompressionSpec(top_k_ratio=0.2, quantize_bits=8)  # bitmap indices, int8 values
BAD = [
    (TOPK, _set("g", lambda g: torch.cat([g[:-1], torch.tensor([1000], dtype=torch.int32)])), "outside"),
    (TOPK, _set("g", lambda g: torch.cat([torch.tensor([-1], dtype=torch.int32), g[1:]])), "outside"),
    (TOPK, _set("g", lambda g: torch.cat([g[:1], -g[1:]])), "increasing"),
    (TOPK, _set("g", lambda g: torch.cat([g[:-1], torch.zeros(1, dtype=torch.int32)])), "increasing"),  # duplicate
    (TOPK, _set("g", lambda g: torch.cat([g[:-1], torch.tensor([2**31 - 1], dtype=torch.int32)])), "outside"),
    (TOPK, _set("g", lambda g: g[:-1].clone()), "expected"),
    (TOPK, _set("g", lambda g: g.to(torch.int64)), "expected"),
    (TOPK, _set("v", lambda v: torch.full_like(v, float("nan"))), "NaN"),
    (TOPK, _set("v", lambda v: torch.full_like(v, float("inf"))), "NaN"),
    (TOPK, _meta("n", 999), "model of 999"),
    (TOPK, _meta("k", 11), "expected"),
    (TOPK, _meta("k", True), "integer"),
    (TOPK, _meta("kind", "patch"), "unknown kind"),
    (TOPK, _meta("format", 2), "not supported"),
    (TOPK, _meta("ver", "../../etc"), "token"),
    (TOPK, _meta("index", "dense"), "dense form"),
    (TOPK, _meta("index", "bitmap"), "do not match"),
    (TOPK, lambda t, m: t.pop("v"), "do not match"),
    (TOPK, lambda t, m: t.update(junk=torch.zeros(1)), "do not match"),
    (TOPKQ, _set("m", lambda b: torch.cat([b[:-1], torch.tensor([255], dtype=torch.uint8)])), "past the end|selects"),
    (TOPKQ, _set("m", lambda b: torch.zeros_like(b)), "selects"),
    (TOPKQ, _set("q", lambda q: torch.full_like(q, -128)), "beyond"),
    (TOPKQ, _set("s", lambda s: -s), "negative"),
    (TOPKQ, _set("s", lambda s: torch.full_like(s, float("inf"))), "non-finite"),
    (TOPKQ, _set("s", lambda s: s[:-1].clone()), "expected"),
    (TOPKQ, _meta("block", 4), "block"),
    (TOPKQ, _meta("quant", "qsgd"), "QSGD|expected"),
]


@pytest.mark.parametrize("spec,edit,match", BAD)
def test_malformed_payload_is_refused_and_state_is_untouched(spec, edit, match) -> None:  # type: ignore[no-untyped-def]
    _, b, payload = _valid(spec)
    before = b.model_of("A")[0]  # type: ignore[index]
    with pytest.raises(WireError, match=match):
        b.receive("A", _tamper(payload, edit), LIMIT)
    assert torch.equal(b.model_of("A")[0], before)  # type: ignore[index]
    b.receive("A", payload, LIMIT)  # the genuine one still fits


def test_delta_that_overflows_the_model_is_refused() -> None:
    _, b, payload = _valid(TOPK)

    def huge(t, m):  # type: ignore[no-untyped-def]
        t["g"] = torch.ones(t["g"].numel(), dtype=torch.int32)
        t["v"] = torch.full_like(t["v"], 3e38)

    b.receive("A", _tamper(payload, huge), LIMIT)  # finite, if absurd: accepted
    again = _tamper(payload, lambda t, m: (huge(t, m), m.update(base=m["ver"])))
    with pytest.raises(WireError, match="non-finite"):
        b.receive("A", again, LIMIT)


def test_plain_container_and_garbage_are_refused() -> None:
    _, b, _ = _valid(TOPK)
    with pytest.raises(WireError, match="encoding"):
        b.receive("A", wire.encode({"w": torch.zeros(1000)}), LIMIT)
    with pytest.raises(WireError):
        b.receive("A", b"\x00" * 100, LIMIT)


@pytest.mark.parametrize("algo", ["zlib", "zstd"])
def test_lossless_stage_refuses_bombs_and_corruption(algo: str) -> None:
    spec = CompressionSpec(top_k_ratio=0.01, lossless=algo)  # type: ignore[arg-type]
    _, b, payload = _valid(spec)
    with pytest.raises(WireError, match="limit"):
        b.receive("A", payload, 100)
    head = C._LOSSLESS_HEAD.size
    with pytest.raises(WireError):
        b.receive("A", payload[:head] + b"\x00" * (len(payload) - head), LIMIT)
    lying = struct.pack("<4sBQ", C.LOSSLESS_MAGIC, C._LOSSLESS_IDS[algo], 10) + payload[head:]
    with pytest.raises(WireError, match="header says|declares"):
        b.receive("A", lying, LIMIT)
    bomb = C.lossless_wrap(bytes(50_000_000), algo)
    assert len(bomb) < 1_000_000
    with pytest.raises(WireError, match="limit"):
        b.receive("A", bomb, 10_000_000)
    small_lie = struct.pack("<4sBQ", C.LOSSLESS_MAGIC, C._LOSSLESS_IDS[algo], 1000) + bomb[head:]
    with pytest.raises(WireError, match="header says|declares"):  # inflating stops at the stated size
        b.receive("A", small_lie, 10_000_000)
    with pytest.raises(WireError, match="unknown lossless"):
        b.receive("A", struct.pack("<4sBQ", C.LOSSLESS_MAGIC, 9, 10) + zlib.compress(b"x" * 10), LIMIT)
    b.receive("A", payload, LIMIT)


def test_all_finite_catches_nan_and_inf_even_when_the_sum_overflows() -> None:
    x = torch.randn(1000, generator=_gen())
    assert C.all_finite(x) and C.all_finite(torch.full((4,), 3e38)) and C.all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17] = bad
        assert not C.all_finite(y)
    both = x.clone()
    both[1], both[2] = float("inf"), -float("inf")
    assert not C.all_finite(both)
    huge = torch.full((4,), 3e38)
    huge[3] = float("inf")
    assert not C.all_finite(huge)
