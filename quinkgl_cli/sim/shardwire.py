"""The bytes one shard of a sharded simulation sends another (the Ray backend): model offers, control messages and
delivery acknowledgements, each framed as a JSON header followed by its payload bytes.

Never pickle: what crosses between Ray workers (possibly machines) is these bytes; Ray only moves them. Each offer
and message carries its delivery key (`quinkgl_cli.sim.shard`), which orders deliveries exactly as one process
would. Owns the format only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from quinkgl_cli.transport.memory import _Offer

Key = tuple[int, ...]
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Message:
    """A control message (``MemoryTransport._deliver``) for a peer of another shard."""

    sender: str
    recipient: str
    kind: str
    data: bytes


@dataclass
class Batch:
    """Everything one shard has for another after a phase or wave."""

    offers: list[tuple[Key, _Offer]] = field(default_factory=list)
    messages: list[tuple[Key, Message]] = field(default_factory=list)
    # sender -> (bytes, models) its offers delivered here: the receiver counts a sender's traffic (as in one process)
    acks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offers) + len(self.messages) + len(self.acks)


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _LEN.pack(len(head)) + head + _LEN.pack(len(payload)) + payload


def encode(batch: Batch) -> bytes:
    parts: list[bytes] = []
    for key, o in batch.offers:
        parts.append(_frame({"t": "offer", "key": list(key), "sender": o.sender, "recipient": o.recipient,
                             "round": o.round, "size": o.size, "digest": o.digest.hex(), "nonce": o.nonce,
                             "encoding": o.encoding, "samples": o.sample_count, "meta": o.meta}, o.payload))
    for key, m in batch.messages:
        parts.append(_frame({"t": "message", "key": list(key), "sender": m.sender, "recipient": m.recipient,
                             "kind": m.kind}, m.data))
    for sender, (size, models) in batch.acks.items():
        parts.append(_frame({"t": "ack", "sender": sender, "bytes": size, "models": models}))
    return b"".join(parts)


def decode(data: bytes) -> Batch:
    """The batch `encode` wrote; raises ValueError on anything else."""
    batch = Batch()
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        try:
            (n,) = _LEN.unpack_from(view, pos)
            header = json.loads(bytes(view[pos + 4 : pos + 4 + n]))
            pos += 4 + n
            (m,) = _LEN.unpack_from(view, pos)
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed shard batch at byte {pos}: {exc}") from exc
        payload = bytes(view[pos + 4 : pos + 4 + m])
        pos += 4 + m
        if len(payload) != m or not isinstance(header, dict):
            raise ValueError(f"truncated shard batch at byte {pos}")
        kind = header.get("t")
        if kind == "offer":
            offer = _Offer(sender=header["sender"], recipient=header["recipient"], round=int(header["round"]),
                           size=int(header["size"]), digest=bytes.fromhex(header["digest"]), nonce=int(header["nonce"]),
                           encoding=str(header["encoding"]), sample_count=int(header["samples"]),
                           meta=dict(header["meta"]), payload=payload)
            batch.offers.append((tuple(int(k) for k in header["key"]), offer))
        elif kind == "message":
            batch.messages.append((tuple(int(k) for k in header["key"]),
                                   Message(header["sender"], header["recipient"], str(header["kind"]), payload)))
        elif kind == "ack":
            batch.acks[str(header["sender"])] = (int(header["bytes"]), int(header["models"]))
        else:
            raise ValueError(f"unknown shard batch entry {kind!r}")
    return batch
