"""The tensor container that crosses the network: a small validated header plus raw little-endian tensor bytes.

Layout (all integers little-endian)::

    b"QGLT"  u16 version  u32 header_len  header (UTF-8 JSON, pydantic-validated)  padding  data

The data region starts at a multiple of ``ALIGN`` bytes from the start of the blob and every entry starts at a
multiple of ``ALIGN`` inside it, in header order, with nothing else in between: the layout is canonical, so a
decoder checks exact offsets rather than trusting them. No pickle anywhere: a blob can only ever become tensors of
the listed dtypes. The container is generic over named tensors, so compressed forms (sparse indices + values,
quantized blocks with their scales) travel in it unchanged, distinguished by ``encoding`` and ``meta``.

Decoding raises `WireError` and nothing else, whatever the bytes: the header is parsed by
`jsonsafe.loads_strict` (no NaN/Infinity, no number that overflows a float, bounded nesting), every dimension is
bounded, and a shape's element count must fit the byte limit even when another dimension is zero.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.jsonsafe import loads_strict
from quinkgl_cli.tensors import TensorSpec, all_finite

MAGIC = b"QGLT"
VERSION = 1
ALIGN = 64
PREFIX = struct.Struct("<4sHI")
DEFAULT_ENCODING = "qgl-tensors/1"
MAX_HEADER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 65_536
DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_NDIM = 16
MAX_DIM = 2**40  # one dimension; torch's own limit is 2**63 - 1, far beyond any model this build exchanges

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def on_wire(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """A model's shared entries as they cross the network: a float64 entry (a model built with ``.double()``) as
    float32. Aggregation, DP and compression work on float32 vectors (`tensors.flatten`) anyway, so the wider type
    would only double the bytes; the receiver writes the values back into its own float64 model."""
    return [TensorSpec(s.name, s.shape, torch.float32) if s.dtype == torch.float64 else s for s in specs]


class WireError(NetworkError):
    """A blob that is not a well-formed tensor container, or does not fit the local model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Entry(_Strict):
    name: str = Field(min_length=1, max_length=512)
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0, le=MAX_DIM)], ...] = Field(max_length=MAX_NDIM)
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class Header(_Strict):
    encoding: str = Field(min_length=1, max_length=64)
    entries: list[Entry]
    meta: dict[str, JsonValue] = Field(default_factory=dict)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ITEMSIZE = {name: _itemsize(dt) for name, dt in DTYPES.items()}


def _le_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, little-endian, as a flat uint8 view (a copy only where it must be)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder != "little" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1).contiguous()
    return raw


# One encoder for every header (``json.dumps`` with options builds a new one each call).
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None, encoding: str = DEFAULT_ENCODING) -> bytes:
    """Serialize named tensors (in the mapping's order) and a small JSON-safe ``meta`` into one blob."""
    entries: list[Entry] = []
    raws: list[torch.Tensor] = []
    offset = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise WireError(f"entry {name!r} is not a tensor")
        dtype_name = DTYPE_NAMES.get(t.dtype)
        if dtype_name is None:
            raise WireError(f"entry {name!r} has unsupported dtype {t.dtype}", f"use one of {', '.join(DTYPES)}")
        raw = _le_bytes(t)
        offset = _align(offset)
        entries.append(Entry(name=name, dtype=dtype_name, shape=tuple(t.shape), offset=offset, nbytes=raw.numel()))
        raws.append(raw)
        offset += raw.numel()
    try:
        header = Header(encoding=encoding, entries=entries, meta=dict(meta or {}))
        header_bytes = _HEADER_ENCODER.encode(header.model_dump(mode="json")).encode()
    except (ValidationError, ValueError, TypeError) as exc:
        raise WireError(f"cannot encode header: {_first_error(exc)}") from exc
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(header_bytes)} bytes, limit {MAX_HEADER_BYTES}", "keep meta small")
    if len({e.name for e in entries}) != len(entries):
        raise WireError("duplicate entry names")
    prefix = PREFIX.pack(MAGIC, VERSION, len(header_bytes))
    head_len = len(prefix) + len(header_bytes)
    data_start = _align(head_len)
    parts: list[Any] = [prefix, header_bytes, bytes(data_start - head_len)]
    pos = 0
    for entry, raw in zip(entries, raws, strict=True):
        if entry.offset > pos:
            parts.append(bytes(entry.offset - pos))
        parts.append(raw.numpy().data)
        pos = entry.offset + entry.nbytes
    return b"".join(parts)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid"))
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_header(data: bytes | bytearray | memoryview, max_entries: int = DEFAULT_MAX_ENTRIES) -> tuple[Header, int]:
    """Parse and validate the header; returns it and where the data region starts."""
    view = memoryview(data)
    if view.nbytes < PREFIX.size:
        raise WireError(f"blob truncated: {view.nbytes} bytes, no room for a header")
    magic, version, header_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError("not a quinkgl tensor blob (bad magic)")
    if version != VERSION:
        raise WireError(f"unsupported tensor blob version {version}", f"this build reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} exceeds limit {MAX_HEADER_BYTES}")
    head_end = PREFIX.size + header_len
    if view.nbytes < head_end:
        raise WireError("blob truncated inside the header")
    try:
        raw_header = loads_strict(bytes(view[PREFIX.size : head_end]).decode("utf-8"))
        if isinstance(raw_header, dict) and isinstance(raw_header.get("entries"), list) and len(raw_header["entries"]) > max_entries:
            raise WireError(f"blob has {len(raw_header['entries'])} entries, limit {max_entries}")
        header = Header.model_validate(raw_header)
    except WireError:
        raise
    except (ValueError, ValidationError) as exc:
        raise WireError(f"malformed header: {_first_error(exc)}") from exc
    return header, _align(head_end)


_CANONICAL_START = b'{"encoding":"'


def declared_encoding(data: bytes | bytearray | memoryview) -> str | None:
    """The encoding a blob's header names, read off its first bytes where the header begins as `encode` writes it
    (``{"encoding":"<name>"``); None where it does not (another writer's key order or escapes, not a blob): only
    `read_header` can tell then. A routing hint that costs no parse: the header is still read and validated whole
    before anything in it is used."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes < PREFIX.size:
        return None
    magic, version, header_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC or version != VERSION:
        return None
    start = len(_CANONICAL_START)
    head = bytes(view[PREFIX.size : PREFIX.size + min(header_len, start + 65)])  # never past the header
    end = head.find(b'"', start)
    if not head.startswith(_CANONICAL_START) or end <= start:
        return None
    name = head[start:end]
    return None if b"\\" in name or not name.isascii() else name.decode("ascii")


def decode(
    data: bytes | bytearray | memoryview,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate a blob and return its tensors and meta (use ``decode_full`` for the encoding name too).

    Tensors view ``data`` directly when it is writable (a ``bytearray``); a read-only buffer is copied once.
    """
    tensors, meta, _ = decode_full(data, max_entries=max_entries, max_bytes=max_bytes)
    return tensors, meta


def decode_full(
    data: bytes | bytearray | memoryview,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes > max_bytes + MAX_HEADER_BYTES + ALIGN * 2:
        raise WireError(f"blob is {view.nbytes} bytes, limit {max_bytes}")
    header, data_start = read_header(view, max_entries=max_entries)
    seen: set[str] = set()
    pos = 0
    for entry in header.entries:
        if entry.name in seen:
            raise WireError(f"duplicate entry {entry.name!r}")
        seen.add(entry.name)
        itemsize = _ITEMSIZE.get(entry.dtype)
        if itemsize is None:
            raise WireError(f"entry {entry.name!r} has unsupported dtype {entry.dtype!r}")
        expected = _numel(entry.shape) * itemsize
        # Checked with zero dimensions counted as one (the same product when there is none): torch refuses to build
        # even an empty tensor whose other dimensions multiply past its index range.
        if (expected if expected else _numel(max(d, 1) for d in entry.shape) * itemsize) > max_bytes:
            raise WireError(f"entry {entry.name!r} of shape {list(entry.shape)} exceeds limit of {max_bytes} bytes")
        if entry.nbytes != expected:
            raise WireError(f"entry {entry.name!r}: {entry.nbytes} bytes do not match shape {list(entry.shape)} of {entry.dtype}")
        if entry.offset != _align(pos):
            raise WireError(f"entry {entry.name!r} at offset {entry.offset}, expected {_align(pos)}")
        pos = entry.offset + entry.nbytes
        if pos > max_bytes:
            raise WireError(f"tensor data exceeds limit of {max_bytes} bytes")
    if view.nbytes != data_start + pos:
        raise WireError(f"blob is {view.nbytes} bytes, header describes {data_start + pos}")
    body = view[data_start:]
    if body.readonly:
        body = memoryview(bytearray(body))
    tensors: dict[str, torch.Tensor] = {}
    swap = sys.byteorder != "little"
    for entry in header.entries:  # ``body`` is writable, so torch has no read-only buffer to warn about
        dtype = DTYPES[entry.dtype]
        if entry.nbytes == 0:
            tensors[entry.name] = torch.empty(entry.shape, dtype=dtype)
            continue
        itemsize = _ITEMSIZE[entry.dtype]
        if swap and itemsize > 1:
            raw = torch.frombuffer(body, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
            flat = raw.reshape(-1, itemsize).flip(1).reshape(-1).contiguous().view(dtype)
        else:
            flat = torch.frombuffer(body, dtype=dtype, count=entry.nbytes // itemsize, offset=entry.offset)
        tensors[entry.name] = flat.reshape(entry.shape)
    return tensors, dict(header.meta), header.encoding


def check_against(tensors: Mapping[str, torch.Tensor], specs: list[TensorSpec], check_dtype: bool = True,
                  finite: bool = True) -> None:
    """Refuse tensors that do not match the local model's shared entries exactly, or (``finite``) hold NaN/Inf."""
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise WireError(f"update lacks {len(missing)} model entries (first: {missing[0]!r})")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise WireError(f"update has {len(extra)} entries the model lacks (first: {extra[0]!r})")
    for name, spec in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(spec.shape):
            raise WireError(f"entry {name!r} has shape {list(t.shape)}, model expects {list(spec.shape)}")
        if check_dtype and t.dtype != spec.dtype:
            raise WireError(f"entry {name!r} has dtype {t.dtype}, model expects {spec.dtype}")
        if finite:
            check_finite(name, t)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not all_finite(t):
        raise WireError(f"entry {name!r} holds NaN or Inf")


def max_blob_bytes(specs: list[TensorSpec], expansion: float = 3.0, meta_allowance: int = 64 * 1024) -> int:
    """The size limit a receiver enforces for updates of a model with these entries.

    ``expansion`` covers encodings larger than the dense tensors: sparse forms at a high keep ratio carry an
    int64 index beside every float32 value (3x). Headers get one entry line per tensor plus ``meta_allowance``.
    """
    dense = sum(_align(s.numel * _itemsize(s.dtype)) for s in specs)
    header = PREFIX.size + meta_allowance + sum(200 + len(s.name) + 24 * len(s.shape) for s in specs)
    return int(dense * expansion) + 4 * _align(header)
