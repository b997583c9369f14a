"""Compressed model updates: delta -> top-k sparsify -> quantize -> tensor container -> optional lossless stage.

Each sender keeps, per receiving peer, a mirror of what that receiver has reconstructed from it (``ref``) and
encodes the difference between its model and that mirror. What compression drops is kept in a per-peer
error-feedback residual and sent later. What is conserved over the K delta sends after a full one (models x_0 at
the full send, x_1 .. x_K at the deltas), by mode:

- error feedback, no EF21 momentum, no residual cap (the default)::

      sum(decoded deltas) + final residual == sum(x_k - x_(k-1)) == x_K - x_0     (information conservation)

  and ``ref + residual`` is always the model at the last send;
- with ``ef21_momentum`` beta the sender tracks t_k = t_(k-1) + beta (x_k - t_(k-1)), t_0 = x_0, and the same
  identity holds for the deltas of t, not of x: sum(decoded) + residual == t_K - t_0 (``ref + residual`` == t_K);
- with ``residual_norm_cap`` the residual is scaled down to the cap whenever it exceeds it, and what the scaling
  removed is gone: the identity fails by the sum of those removals (the sender keeps t_K itself, ``last``);
- without error feedback nothing dropped is ever sent: ``ref`` lags the sender's model by every dropped part.

QSGD rounding is unbiased but not exact; with error feedback its rounding error goes into the residual like a
dropped coordinate, so the identities above hold for it too.

The receiver keeps one reconstructed model per sender and applies each delta to it. Every payload names the
version it was computed against (``base``) and the version it produces (``ver``), both random tokens: a delta
whose base is not what the receiver holds (a lost or reordered message, a restart from an older checkpoint) is
refused with ``StaleBase``; the node answers with a ``RESYNC_KIND`` control message and the sender's next send
to that peer carries full weights. Full weights travel as exact float32, so a chain always restarts from an
exact copy.

Formats inside the container (``wire`` encoding ``ENCODING``; meta key ``META_KEY`` holds the description):
indices as int32 gaps (``g``: the first index, then differences between consecutive ascending indices, small
numbers the lossless stage packs well) or a bitmap (``m``, bit j of byte b is index 8b+j), whichever is smaller;
values as float32 (``v``) or blockwise-quantized integers (``q``) with one float32 scale per block (``s``).
The optional lossless stage wraps the whole container: ``LOSSLESS_MAGIC``, one algorithm byte, the u64 size of
the container, then the zlib or zstd stream; the size is checked against the receiver's limit before inflating.
"""

from __future__ import annotations

import math
import re
import secrets
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from quinkgl_cli import wire
from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.tensors import all_finite
from quinkgl_cli.wire import WireError

ENCODING = "qgl-compressed/1"
META_KEY = "compression"
FORMAT_VERSION = 1
EXTRA_PREFIX = "extra/"
RESYNC_KIND = "compression-resync"  # control message: "your deltas do not fit what I hold, send full weights"
LOSSLESS_MAGIC = b"QGLZ"
_LOSSLESS_HEAD = struct.Struct("<4sBQ")
_LOSSLESS_IDS = {"zlib": 1, "zstd": 2}
_LOSSLESS_NAMES = {v: k for k, v in _LOSSLESS_IDS.items()}
_TOKEN = re.compile(r"^[0-9a-f]{16}$")
_INT_RANGE = {8: (torch.int8, 127), 16: (torch.int16, 32767)}


class StaleBase(WireError):
    """A delta computed against a model version this receiver does not hold."""


# ---------------------------------------------------------------------------------------------- primitives
def topk_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest magnitude."""
    if k >= v.numel():
        return torch.arange(v.numel())
    idx = torch.topk(v.abs(), k, sorted=False).indices
    return torch.sort(idx).values


def pack_bitmap(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8)
    mask[idx] = 1
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (mask.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bitmap(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = ((bits.unsqueeze(1) >> shifts) & 1).view(-1)
    if bool(mask[n:].any()):
        raise WireError("index bitmap has bits set past the end of the model")
    return torch.nonzero(mask[:n], as_tuple=False).view(-1)


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    """``v`` as rows of ``block`` values, zero-padded."""
    n = v.numel()
    rows = (n + block - 1) // block
    if rows * block == n:
        return v.view(rows, block)
    padded = torch.zeros(rows * block, dtype=v.dtype)
    padded[:n] = v
    return padded.view(rows, block)


def quantize_blockwise(v: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest integers with one scale per block: |v - dequantized| <= scale / 2."""
    dtype, qmax = _INT_RANGE[bits]
    rows = _blocks(v, block)
    scales = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe.unsqueeze(1)).clamp_(-qmax, qmax).to(dtype)
    return q.view(-1)[: v.numel()].clone(), scales


def qsgd_quantize(v: torch.Tensor, levels: int, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """QSGD stochastic rounding to ``levels`` levels of each block's L2 norm: unbiased, E[dequantized] = v."""
    rows = _blocks(v, block)
    norms = torch.linalg.vector_norm(rows, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scaled = rows.abs() / safe.unsqueeze(1) * levels
    low = torch.floor(scaled)
    up = torch.rand(scaled.shape, generator=generator) < (scaled - low)
    q = (low + up.to(low.dtype)).clamp_(0, levels) * torch.sign(rows)
    return q.view(-1)[: v.numel()].to(_qsgd_dtype(levels)), norms


def _qsgd_dtype(levels: int) -> torch.dtype:
    return torch.int8 if levels <= 127 else torch.int16 if levels <= 32767 else torch.int32


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: int, divisor: float = 1.0) -> torch.Tensor:
    """Inverse of the quantizers: integer * scale of its block (/ levels for QSGD)."""
    n = q.numel()
    rows = _blocks(q.to(torch.float32), block)
    out = rows * (scales / divisor).unsqueeze(1)
    return out.view(-1)[:n]


# ---------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Layout:
    """How one vector is laid out in the container; the receiver checks every field against it."""

    kind: str  # "full" | "delta"
    n: int
    k: int  # entries carried
    index: str  # "dense" | "gaps" | "bitmap"
    quant: str  # "f32" | "int8" | "int16" | "qsgd"
    block: int
    levels: int = 0


def _quant_name(spec: CompressionSpec) -> str:
    if spec.qsgd_levels is not None:
        return "qsgd"
    if spec.quantize_bits is not None:
        return f"int{spec.quantize_bits}"
    return "f32"


def compress_vector(
    v: torch.Tensor, spec: CompressionSpec, kind: str, generator: torch.Generator, exact: bool = False
) -> tuple[dict[str, torch.Tensor], Layout]:
    """Sparsify (deltas only) and quantize (unless ``exact``) ``v`` into container tensors."""
    n = v.numel()
    quant = "f32" if exact else _quant_name(spec)
    value_bytes = {"f32": 4, "int8": 1, "int16": 2}.get(quant, _qsgd_dtype(spec.qsgd_levels or 1).itemsize)
    tensors: dict[str, torch.Tensor] = {}
    index = "dense"
    values = v
    k = n
    if kind == "delta" and spec.top_k_ratio is not None and spec.top_k_ratio < 1.0 and n:
        k = max(1, math.ceil(spec.top_k_ratio * n))
        index_bytes = min(4 * k, (n + 7) // 8)
        if index_bytes + k * value_bytes < n * value_bytes:
            idx = topk_indices(v, k)
            values = v[idx]
            if 4 * k <= (n + 7) // 8:
                index = "gaps"
                tensors["g"] = torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32)
            else:
                index = "bitmap"
                tensors["m"] = pack_bitmap(idx, n)
        else:
            k = n
    if quant == "f32":
        tensors["v"] = values.clone() if values is v else values  # the caller goes on to modify v in place
    elif quant == "qsgd":
        assert spec.qsgd_levels is not None
        tensors["q"], tensors["s"] = qsgd_quantize(values, spec.qsgd_levels, spec.block_size, generator)
    else:
        tensors["q"], tensors["s"] = quantize_blockwise(values, int(quant[3:]), spec.block_size)
    layout = Layout(kind, n, k, index, quant, spec.block_size, (spec.qsgd_levels or 0) if quant == "qsgd" else 0)
    return tensors, layout


def layout_meta(layout: Layout) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": layout.kind, "n": layout.n, "k": layout.k, "index": layout.index,
            "quant": layout.quant, "block": layout.block, "levels": layout.levels}


def _int_field(meta: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"compressed update: field {key!r} is {value!r}, expected an integer in [{lo}, {hi}]")
    return value


def parse_layout(meta: Mapping[str, Any], n: int) -> Layout:
    if _int_field(meta, "format", 0, 1 << 30) != FORMAT_VERSION:
        raise WireError(f"compressed update format {meta.get('format')} is not supported", f"this build reads {FORMAT_VERSION}")
    kind = meta.get("kind")
    index = meta.get("index")
    quant = meta.get("quant")
    if kind not in ("full", "delta"):
        raise WireError(f"compressed update: unknown kind {kind!r}")
    if index not in ("dense", "gaps", "bitmap") or quant not in ("f32", "int8", "int16", "qsgd"):
        raise WireError(f"compressed update: unknown index/quantization {index!r}/{quant!r}")
    got_n = _int_field(meta, "n", 0, 1 << 40)
    if got_n != n:
        raise WireError(f"compressed update is for a model of {got_n} values, this model has {n}", "the peers run different architectures")
    k = _int_field(meta, "k", 0, n)
    block = _int_field(meta, "block", 8, 1 << 20)
    levels = _int_field(meta, "levels", 0, 65535)
    if kind == "full" and index != "dense":
        raise WireError("compressed update: full weights must be dense")
    if index == "dense" and k != n:
        raise WireError(f"compressed update: dense form with k={k} != n={n}")
    if (quant == "qsgd") != (levels > 0):
        raise WireError("compressed update: QSGD level count missing or misplaced")
    return Layout(kind, n, k, index, quant, block, levels)  # type: ignore[arg-type]


def _expect(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise WireError(f"compressed update lacks entry {name!r}")
    if t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
        raise WireError(f"compressed update entry {name!r} is {t.dtype} {list(t.shape)}, expected {dtype} [{numel}]")
    return t


def decompress_vector(tensors: Mapping[str, torch.Tensor], layout: Layout) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Validate the container tensors against ``layout``; returns (indices or None for dense, float32 values)."""
    n, k = layout.n, layout.k
    names = {"dense": set(), "gaps": {"g"}, "bitmap": {"m"}}[layout.index]
    names |= {"v"} if layout.quant == "f32" else {"q", "s"}
    if set(tensors) != names:
        raise WireError(f"compressed update entries {sorted(tensors)} do not match its layout {sorted(names)}")
    idx: torch.Tensor | None = None
    if layout.index == "gaps":
        gaps = _expect(tensors, "g", torch.int32, k)
        if k and int(gaps[0]) < 0:
            raise WireError(f"compressed update has an index outside [0, {n})")
        if k > 1 and int(gaps[1:].min()) < 1:
            raise WireError("compressed update indices are not strictly increasing")
        idx = torch.cumsum(gaps, 0, dtype=torch.int64)
        if k and int(idx[-1]) >= n:
            raise WireError(f"compressed update has an index outside [0, {n})")
    elif layout.index == "bitmap":
        idx = unpack_bitmap(_expect(tensors, "m", torch.uint8, (n + 7) // 8), n)
        if idx.numel() != k:
            raise WireError(f"compressed update bitmap selects {idx.numel()} entries, header says {k}")
    if layout.quant == "f32":
        values = _expect(tensors, "v", torch.float32, k)
    else:
        if layout.quant == "qsgd":
            dtype, qmax = _qsgd_dtype(layout.levels), layout.levels
        else:
            dtype, qmax = _INT_RANGE[int(layout.quant[3:])]
        q = _expect(tensors, "q", dtype, k)
        scales = _expect(tensors, "s", torch.float32, (k + layout.block - 1) // layout.block)
        if k and int(q.to(torch.int64).abs().max()) > qmax:
            raise WireError(f"compressed update holds a quantized value beyond +-{qmax}")
        if scales.numel() and not (all_finite(scales) and float(scales.min()) >= 0.0):
            raise WireError("compressed update holds a negative or non-finite scale")
        values = dequantize(q, scales, layout.block, float(layout.levels) if layout.quant == "qsgd" else 1.0)
    if values.numel() and not all_finite(values):
        raise WireError("compressed update holds NaN or Inf")
    return idx, values


# ---------------------------------------------------------------------------------------------- lossless stage
def lossless_wrap(blob: bytes, algo: str, level: int = 3) -> bytes:
    if algo == "none":
        return blob
    if algo == "zlib":
        body = zlib.compress(blob, level)
    else:
        import zstandard  # only swarms that ask for zstd pay its import

        body = zstandard.ZstdCompressor(level=level).compress(blob)
    return _LOSSLESS_HEAD.pack(LOSSLESS_MAGIC, _LOSSLESS_IDS[algo], len(blob)) + body


def lossless_unwrap(payload: bytes | bytearray | memoryview, max_bytes: int) -> bytes | bytearray | memoryview:
    """Undo ``lossless_wrap``; a plain container passes through. Refuses to inflate past ``max_bytes``."""
    view = memoryview(payload)
    if view.nbytes < _LOSSLESS_HEAD.size or bytes(view[:4]) != LOSSLESS_MAGIC:
        return payload
    _, algo_id, size = _LOSSLESS_HEAD.unpack_from(view, 0)
    algo = _LOSSLESS_NAMES.get(algo_id)
    if algo is None:
        raise WireError(f"compressed update uses unknown lossless algorithm id {algo_id}")
    if size > max_bytes:
        raise WireError(f"compressed update inflates to {size} bytes, limit {max_bytes}")
    body = view[_LOSSLESS_HEAD.size :]
    if algo == "zlib":
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(body, size + 1)
        except zlib.error as exc:
            raise WireError(f"compressed update: corrupt zlib stream ({exc})") from exc
        complete = inflater.eof and not inflater.unused_data
    else:
        import zstandard

        # The frame states its own size: checking it first means a bomb never gets a buffer.
        try:
            declared = zstandard.frame_content_size(body)
            if declared != size:
                raise WireError(f"compressed update: zstd frame declares {declared} bytes, header says {size}")
            out = zstandard.ZstdDecompressor().decompress(body, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise WireError(f"compressed update: corrupt zstd stream ({exc})") from exc
        complete = True
    if not complete or len(out) != size:
        raise WireError(f"compressed update: {algo} stream gives {len(out)} bytes, header says {size}")
    return out


def is_compressed(payload: bytes | bytearray | memoryview) -> bool:
    """Whether ``payload`` is this codec's (wrapped or plain container of ``ENCODING``), from its first bytes."""
    view = memoryview(payload)
    if bytes(view[:4]) == LOSSLESS_MAGIC:
        return True
    declared = wire.declared_encoding(view)  # every update is asked on arrival: most answer without a parse
    if declared is not None:
        return declared == ENCODING
    try:
        header, _ = wire.read_header(view, max_entries=64)
    except WireError:
        return False
    return header.encoding == ENCODING


@dataclass(frozen=True)
class Payload:
    """A validated compressed update: its layout, version tokens, the vector it carries, extras and meta."""

    layout: Layout
    ver: str
    base: str
    idx: torch.Tensor | None  # None: dense
    values: torch.Tensor
    extras: dict[str, torch.Tensor]
    meta: dict[str, Any]


def read_payload(payload: bytes | bytearray | memoryview, numel: int, max_bytes: int, mode: str) -> Payload:
    """Unwrap, parse and validate one compressed update for a model of ``numel`` values; raises WireError.

    ``mode`` is the receiver's (`CompressionSpec.mode`): a payload of the other mode is refused, since its
    version chain means something else (a reconstruction versus a public estimate)."""
    blob = lossless_unwrap(payload, max_bytes)
    tensors, meta, encoding = wire.decode_full(blob, max_entries=64, max_bytes=max_bytes)
    if encoding != ENCODING:
        raise WireError(f"update encoding is {encoding!r}, this swarm compresses updates ({ENCODING})")
    desc = meta.pop(META_KEY, None)
    if not isinstance(desc, dict):
        raise WireError("compressed update lacks its description")
    got_mode = desc.get("mode", "reconstruct")
    if got_mode != mode:
        raise WireError(f"compressed update is of mode {got_mode!r}, this node runs {mode!r}",
                        "the peers run different compression settings")
    layout = parse_layout(desc, numel)
    ver, base = desc.get("ver"), desc.get("base")
    if not isinstance(ver, str) or not _TOKEN.match(ver):
        raise WireError("compressed update has a malformed version token")
    if not isinstance(base, str):
        raise WireError("compressed update has a malformed base token")
    extras = {k[len(EXTRA_PREFIX):]: t for k, t in tensors.items() if k.startswith(EXTRA_PREFIX)}
    for name, t in extras.items():
        wire.check_finite(name, t)
    body = {k: t for k, t in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    idx, values = decompress_vector(body, layout)
    return Payload(layout, ver, base, idx, values, extras, meta)


# ---------------------------------------------------------------------------------------------- stateful codec
@dataclass
class _TxPeer:
    ref: torch.Tensor  # what the receiver holds from us
    ver: str
    residual: torch.Tensor | None  # error feedback
    last: torch.Tensor | None  # our (momentum-averaged) model at the last send; implicit ref + residual otherwise


@dataclass
class _RxPeer:
    model: torch.Tensor
    ver: str
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    payload: bytes
    kind: str
    raw_bytes: int  # the dense float32 model this stands for
    wire_bytes: int
    sent_indices: torch.Tensor | None  # what the receiver will add (None: dense); for tests and metrics
    sent_values: torch.Tensor
    residual_norm: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.wire_bytes, 1)


@dataclass(frozen=True)
class Received:
    kind: str
    wire_bytes: int
    meta: dict[str, Any]


@dataclass
class CodecStats:
    """Cumulative counters; the node reports per-round differences."""

    bytes_raw_sent: int = 0
    bytes_wire_sent: int = 0
    bytes_raw_received: int = 0
    bytes_wire_received: int = 0
    full_sent: int = 0
    delta_sent: int = 0
    received: int = 0
    rejected: int = 0
    resyncs: int = 0

    def snapshot(self) -> tuple[int, ...]:
        return (self.bytes_raw_sent, self.bytes_wire_sent, self.bytes_raw_received, self.bytes_wire_received,
                self.full_sent, self.delta_sent, self.received, self.rejected, self.resyncs)


def ratio(raw: int, wire_bytes: int) -> float:
    return raw / wire_bytes if wire_bytes else 1.0


class UpdateCodec:
    """Per-peer sender and receiver state of one node. Thread-safe: the send and receive sides lock separately.

    ``max_peers`` bounds memory (each peer costs one to three model-sized vectors per side): the least recently
    used peer's state is dropped, which only costs a full-weights send or a resync.
    """

    def __init__(self, spec: CompressionSpec, numel: int, *, max_peers: int = 64, seed: int | None = None) -> None:
        self.spec = spec
        self.numel = numel
        self.max_peers = max_peers
        self.stats = CodecStats()
        self._gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self._tx: OrderedDict[str, _TxPeer] = OrderedDict()
        self._rx: OrderedDict[str, _RxPeer] = OrderedDict()
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._keep_last = spec.delta and (not spec.error_feedback or spec.residual_norm_cap is not None)

    # ------------------------------------------------------------------ sender
    def encode(self, peer_id: str, flat: torch.Tensor, *, extras: Mapping[str, torch.Tensor] | None = None,
               meta: Mapping[str, Any] | None = None) -> Encoded:
        """The payload for ``peer_id``; advances our mirror of what it will hold (assumes delivery, see resync)."""
        if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != self.numel or flat.device.type != "cpu":
            raise ValueError(f"expected a float32 CPU vector of {self.numel} values, got {flat.dtype} "
                             f"{list(flat.shape)} on {flat.device}")
        with self._tx_lock:
            state = self._tx.get(peer_id) if self.spec.delta else None
            ver = secrets.token_hex(8)
            residual_norm = 0.0
            if state is None:
                # First contact, a resync, or no delta coding: weights, exact when they start a delta chain.
                kind, base = ("full", "")
                tensors, layout = compress_vector(flat, self.spec, "full", self._gen, exact=self.spec.delta)
                idx, values = decompress_vector(tensors, layout)
                if self.spec.delta:
                    new = _TxPeer(values.clone(), ver, torch.zeros_like(flat) if self.spec.error_feedback else None, None)
                    if self._keep_last:
                        new.last = flat.clone()
                    self._remember(self._tx, peer_id, new)
            else:
                kind, base = ("delta", state.ver)
                last = state.last if state.last is not None else state.ref + state.residual  # type: ignore[operator]
                target = flat
                if self.spec.ef21_momentum is not None:
                    target = last + self.spec.ef21_momentum * (flat - last)
                if self.spec.error_feedback:
                    v = target - state.ref if state.last is None else state.residual + (target - last)  # type: ignore[operator]
                else:
                    v = target - last
                tensors, layout = compress_vector(v, self.spec, "delta", self._gen)
                idx, values = decompress_vector(tensors, layout)
                if idx is None:
                    state.ref.add_(values)
                    v.sub_(values)
                else:
                    state.ref.index_add_(0, idx, values)
                    v.index_add_(0, idx, values, alpha=-1.0)
                if self.spec.error_feedback:
                    cap = self.spec.residual_norm_cap
                    norm = float(torch.linalg.vector_norm(v))
                    if cap is not None and norm > cap:
                        v.mul_(cap / norm)
                        norm = cap
                    state.residual = v
                    residual_norm = norm
                if state.last is not None:
                    state.last = target.clone() if target is flat else target
                state.ver = ver
                self._tx.move_to_end(peer_id)
            blob_meta: dict[str, Any] = dict(meta or {})
            blob_meta[META_KEY] = {**layout_meta(layout), "ver": ver, "base": base}
            for name, t in (extras or {}).items():
                tensors[EXTRA_PREFIX + name] = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            blob = wire.encode(tensors, meta=blob_meta, encoding=ENCODING)
            payload = lossless_wrap(blob, self.spec.lossless)
            self.stats.bytes_raw_sent += 4 * self.numel
            self.stats.bytes_wire_sent += len(payload)
            if kind == "full":
                self.stats.full_sent += 1
            else:
                self.stats.delta_sent += 1
        return Encoded(payload, kind, 4 * self.numel, len(payload), idx, values, residual_norm)

    def reset_peer(self, peer_id: str) -> None:
        """Forget what ``peer_id`` holds from us (it asked for a resync): the next send is full weights."""
        with self._tx_lock:
            if self._tx.pop(peer_id, None) is not None:
                self.stats.resyncs += 1

    def residual(self, peer_id: str) -> torch.Tensor | None:
        with self._tx_lock:
            state = self._tx.get(peer_id)
            return None if state is None or state.residual is None else state.residual.clone()

    # ------------------------------------------------------------------ receiver
    def receive(self, sender: str, payload: bytes | bytearray | memoryview, max_bytes: int) -> Received:
        """Validate a payload and apply it to ``sender``'s reconstructed model. Raises WireError / StaleBase."""
        got = read_payload(payload, self.numel, max_bytes, mode="reconstruct")
        layout, ver, base, idx, values, extras, meta = (got.layout, got.ver, got.base, got.idx, got.values,
                                                         got.extras, got.meta)
        with self._rx_lock:
            state = self._rx.get(sender)
            if layout.kind == "full":
                model = values.clone()
            else:
                if state is None or base != state.ver:
                    self.stats.rejected += 1
                    raise StaleBase(f"delta from {sender} is against a model version this node does not hold",
                                    "asking the sender for full weights")
                model = state.model.clone()
                if idx is None:
                    model.add_(values)
                else:
                    model.index_add_(0, idx, values)
                if not all_finite(model):
                    self.stats.rejected += 1
                    raise WireError("compressed update makes the model non-finite")
            self._remember(self._rx, sender, _RxPeer(model, ver, {k: t.clone() for k, t in extras.items()}))
            self.stats.received += 1
            self.stats.bytes_raw_received += 4 * self.numel
            self.stats.bytes_wire_received += memoryview(payload).nbytes
        return Received(layout.kind, memoryview(payload).nbytes, meta)

    def model_of(self, sender: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """A copy of ``sender``'s reconstructed model and the extras it last sent, or None."""
        with self._rx_lock:
            state = self._rx.get(sender)
            return None if state is None else (state.model.clone(), dict(state.extras))

    def forget_sender(self, sender: str) -> None:
        with self._rx_lock:
            self._rx.pop(sender, None)

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_peers:
            table.popitem(last=False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals and references as tensors (version tokens as uint8 ASCII) for the node's checkpoint."""
        out: dict[str, torch.Tensor] = {}
        with self._tx_lock:
            for peer, tx in self._tx.items():
                out[f"tx/{peer}/ref"] = tx.ref.clone()
                out[f"tx/{peer}/ver"] = token_tensor(tx.ver)
                if tx.residual is not None:
                    out[f"tx/{peer}/residual"] = tx.residual.clone()
                if tx.last is not None:
                    out[f"tx/{peer}/last"] = tx.last.clone()
        with self._rx_lock:
            for peer, rx in self._rx.items():
                out[f"rx/{peer}/model"] = rx.model.clone()
                out[f"rx/{peer}/ver"] = token_tensor(rx.ver)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from ``state_dict``; refuses entries that do not fit this model or configuration."""
        groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            side, _, rest = key.partition("/")
            peer, _, name = rest.rpartition("/")
            if side not in ("tx", "rx") or not peer or name not in ("ref", "ver", "residual", "last", "model"):
                raise ValueError(f"compression state has unexpected entry {key!r}")
            groups.setdefault((side, peer), {})[name] = t
        tx: OrderedDict[str, _TxPeer] = OrderedDict()
        rx: OrderedDict[str, _RxPeer] = OrderedDict()
        for (side, peer), g in groups.items():
            ver = token_str(g.get("ver"), f"{side}/{peer}")
            if side == "tx":
                tx[peer] = _TxPeer(self._vector(g, "ref", peer), ver,
                                   self._vector(g, "residual", peer) if self.spec.error_feedback else None,
                                   self._vector(g, "last", peer) if self._keep_last else None)
            else:
                rx[peer] = _RxPeer(self._vector(g, "model", peer), ver)
        with self._tx_lock:
            self._tx = tx if self.spec.delta else OrderedDict()
        with self._rx_lock:
            self._rx = rx

    def _vector(self, group: Mapping[str, torch.Tensor], name: str, peer: str) -> torch.Tensor:
        t = group.get(name)
        if t is None:
            raise ValueError(f"compression state for {peer} lacks {name!r} (was it saved with other settings?)")
        if t.dtype != torch.float32 or tuple(t.shape) != (self.numel,) or not all_finite(t):
            raise ValueError(f"compression state {name!r} for {peer} does not fit a model of {self.numel} values")
        return t.clone()


def token_tensor(token: str) -> torch.Tensor:
    """A version token as checkpoint tensor (state is tensors only: never pickle)."""
    return torch.tensor(list(token.encode("ascii")), dtype=torch.uint8)


def token_str(t: torch.Tensor | None, where: str, owner: str = "compression state") -> str:
    """The version token a checkpoint tensor holds; ValueError naming ``owner`` and ``where`` if it holds none."""
    if t is None or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{owner} {where} lacks a version token")
    token = bytes(t.tolist()).decode("ascii", errors="replace")
    if not _TOKEN.match(token):
        raise ValueError(f"{owner} {where} has a malformed version token")
    return token
