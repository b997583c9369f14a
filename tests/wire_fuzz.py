"""Seeded fuzz cases for the tensor container decoder, shared by tests/test_wire.py (a few thousand cases, in CI)
and benchmarks/fuzz_wire.py (a million).

Each case starts from a valid blob of a small model's update and breaks it one way: flipped bytes, a wrong length
field, truncation, or a header rewritten as JSON text with hostile values where the decoder expects numbers,
shapes and names (negative, huge and overflowing dimensions, NaN/Infinity/1e400, 5000-digit integers, nesting
thousands deep, wrong types). `run_case` decodes it as a node does and says how that ended; anything but
"refused" (a WireError) or "accepted" is a defect.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Callable
from typing import Any

import torch

from quinkgl_cli import wire
from quinkgl_cli.tensors import TensorSpec

SPECS = [
    TensorSpec("w", (4, 3), torch.float32),
    TensorSpec("b", (4,), torch.float32),
    TensorSpec("h", (2, 2), torch.float16),
]

_HOSTILE_NUMBERS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "9" * 5000, "-" + "9" * 400, "2e308",
    str(2**63), str(2**64), str(-(2**63)), str(2**40), str(2**31), "-1", "0", "1.5", "1e5", "true", "null",
    '"4"', "[]", "{}",
]


def _valid_blobs(count: int = 8) -> list[tuple[bytes, str]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        tensors = {s.name: torch.randn(s.shape, generator=g).to(s.dtype) for s in SPECS}
        blob = wire.encode(tensors, {"round": i, "step": i / 3, "tag": "x" * (i % 4)})
        header, _ = wire.read_header(blob)
        out.append((blob, json.dumps(header.model_dump(mode="json"))))
    return out


_VALID = _valid_blobs()


def _valid(rng: random.Random) -> tuple[bytes, dict[str, Any]]:
    """A valid blob and its header as a fresh dict (the caller may change it)."""
    blob, header_text = rng.choice(_VALID)
    return blob, json.loads(header_text)


def _with_header(blob: bytes, header_text: str, header_len: int | None = None) -> bytes:
    """``blob`` with its header replaced by ``header_text`` and the data region kept where the new header ends."""
    old, start = wire.read_header(blob)
    body = blob[start:]
    raw = header_text.encode("utf-8", "surrogatepass")
    head_end = wire.PREFIX.size + len(raw)
    prefix = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, len(raw) if header_len is None else header_len)
    return prefix + raw + bytes(-head_end % wire.ALIGN) + body


def _nested(rng: random.Random) -> str:
    depth = rng.choice([33, 100, 1000, 5000, 20_000])
    left, right = rng.choice([("[", "]"), ('{"a":', "}")])
    return left * depth + "1" + right * depth


def _mutate_json(rng: random.Random, header: dict[str, Any]) -> str:
    """The header as JSON text with one field (or meta) replaced by a hostile token."""
    entry = rng.randrange(len(header["entries"]))
    field = rng.choice(["shape", "shape_item", "offset", "nbytes", "dtype", "name", "meta", "meta_deep", "entries", "encoding"])
    marker = "\u0000MARK\u0000"
    target = header["entries"][entry]
    if field == "shape":
        dims = [rng.choice([0, 0, 1, 2, 2**31, 2**40, 2**40 + 1, 2**62, 2**63, -1, -(2**63)]) for _ in range(rng.randrange(1, 18))]
        target["shape"] = dims
        return json.dumps(header)
    if field == "shape_item":
        target["shape"] = [marker, *target["shape"]]
    elif field in ("offset", "nbytes", "dtype", "name"):
        target[field] = marker
    elif field == "meta":
        header["meta"][rng.choice(["round", "step", "x"])] = marker
    elif field == "meta_deep":
        header["meta"]["deep"] = marker
        return json.dumps(header).replace(json.dumps(marker), _nested(rng))
    elif field == "entries":
        header["entries"] = marker
    else:
        header["encoding"] = marker
    return json.dumps(header).replace(json.dumps(marker), rng.choice(_HOSTILE_NUMBERS))


def _consistent(blob: bytes, header: dict[str, Any]) -> bytes:
    """Offsets, byte counts and the data region made to agree with the (hostile) shapes, so that only the shapes
    themselves stand between the blob and torch; a region past 1 MB is left short (the size checks refuse it)."""
    pos = 0
    for entry in header["entries"]:
        numel = 1
        for d in entry["shape"]:
            numel *= d
        entry["offset"] = (pos + wire.ALIGN - 1) // wire.ALIGN * wire.ALIGN
        entry["nbytes"] = numel * wire._ITEMSIZE.get(entry["dtype"], 4)
        pos = entry["offset"] + entry["nbytes"]
    text = json.dumps(header)
    out = _with_header(blob, text)
    _, start = wire.read_header(blob)
    head = out[: len(out) - (len(blob) - start)]
    return head + bytes(pos) if 0 <= pos <= 2**20 else out


def make_case(rng: random.Random) -> bytes:
    blob, header = _valid(rng)
    kind = rng.randrange(8)
    if kind == 7:  # hostile shapes with everything else consistent
        for entry in header["entries"]:
            if rng.random() < 0.5:
                entry["shape"] = [rng.choice([0, 1, 3, 2**31, 2**40, 2**40 + 1, 2**62, 2**63 - 1, 2**63, -1, -4])
                                  for _ in range(rng.randrange(0, 18))]
        return _consistent(blob, header)
    if kind == 0:  # flipped bytes anywhere
        data = bytearray(blob)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 1:  # flipped bytes inside the header text
        _, start = wire.read_header(blob)
        data = bytearray(blob)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(wire.PREFIX.size, start)] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # truncated or extended
        cut = rng.randrange(len(blob) + 64)
        return blob[:cut] if cut <= len(blob) else blob + bytes(rng.randrange(256) for _ in range(cut - len(blob)))
    if kind == 3:  # a wrong header length field
        length = rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(4096)])
        return blob[:6] + struct.pack("<I", length) + blob[10:]
    if kind == 4:  # a whole header of nesting
        return _with_header(blob, _nested(rng))
    return _with_header(blob, _mutate_json(rng, header))


def _finite_numbers(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def run_case(blob: bytes, decode: Callable[..., Any] = wire.decode_full) -> str:
    """Decode as a node does (limits, then the model check): ``"refused"`` (a WireError), ``"accepted"``,
    ``"accepted-non-finite"`` (decoded with a NaN or infinite number in meta), or the name of any other exception
    the decoder let escape."""
    try:
        tensors, meta, _ = decode(blob, max_entries=len(SPECS) + 64, max_bytes=wire.max_blob_bytes(SPECS) * 2)
        wire.check_against(tensors, SPECS)
    except wire.WireError:
        return "refused"
    except Exception as exc:  # the point of the fuzz: anything else escaping is what it counts
        return type(exc).__name__
    return "accepted" if _finite_numbers(meta) else "accepted-non-finite"


ESCAPE_FREE = frozenset({"refused", "accepted"})
