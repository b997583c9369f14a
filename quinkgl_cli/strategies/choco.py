"""CHOCO gossip (Koloskova, Stich and Jaggi, 2019): compressed gossip that converges, on public estimates.

Every node keeps a public estimate x̂ of its own model and one of each neighbour's. At each exchange it computes
one increment q = Q(x - x̂_self) with the swarm's compressor (top-k, int8/int16, QSGD; `strategies.compression`),
adds it to x̂_self and sends the same q to every recipient, which adds it to its estimate of the sender. The
consensus step then moves the model by differences of estimates only::

    x <- x + gamma * sum_j w_j (x̂_j - x̂_self)

Both estimates lag their models by what has not been sent yet, and those lags largely cancel in the difference,
whereas averaging a reconstructed model (the ``reconstruct`` mode) mixes the lag itself into the model. What the
compressor drops stays in x - x̂_self and is sent later: the estimate is its own error feedback.

The node does the step through its aggregator (`ConsensusStep` in `node.exchange`): a neighbour's update is decoded
as the guess ``x + (x̂_j - x̂_self)``, the manifest's averaging rule (weights w_j, the poison guard) combines the
guesses with the local model, and the result moves the model by ``gamma`` of the way. The serving model averages
the guesses themselves.

Estimates must agree bit for bit on both sides, so each increment names the estimate version it applies to
(``base``) and the one it produces (``ver``), as the reconstruct mode does. Every estimate starts from the swarm's
common initial model (peers seed it from the swarm id), whose version is its content hash: peers that started
together need no full send, and a peer that joins late with the same initial model is at once understood. A
receiver that holds another version of the sender's estimate (it missed an increment, restarted without its
checkpoint, started from other weights) refuses the increment (`StaleBase`) and asks for a resync; the sender's
next message to it carries its estimate in full, exact float32, once, and increments follow. A recipient the
sender never sent to gets the full estimate as soon as the sender's chain has left the initial model. This is why
CHOCO needs topologies whose recipients stay the same from round to round (RingTopology, ExpanderTopology,
FullTopology): with a new random choice every round most increments would miss most of the peers that hold the
estimate, and each would cost a full send.

Memory: two model-sized vectors (the initial model, x̂_self) plus one per neighbour estimate, at most
``max_peers``; an estimate not updated for ``max_age`` rounds is dropped (a silent peer's estimate must not keep
pulling the model), and so is the least recently heard one beyond ``max_peers``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quinkgl_cli import wire
from quinkgl_cli.manifest.schema import CompressionSpec
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, AggregatorWrapper, PeerUpdate
from quinkgl_cli.strategies.compression import (
    ENCODING,
    META_KEY,
    CodecStats,
    StaleBase,
    compress_vector,
    decompress_vector,
    layout_meta,
    lossless_wrap,
    read_payload,
    token_str,
    token_tensor,
)
from quinkgl_cli.tensors import all_finite

MODE = "choco"
_OWNER = "CHOCO state"  # how checkpoint errors name this state


def default_step(spec: CompressionSpec) -> float:
    """The consensus step when the manifest names none: 1 (a plain averaging step) when every coordinate travels
    (int8/int16, QSGD: the estimate follows the model closely); under top-k, 2 * sqrt(kept fraction), at most 0.5
    (top-1%: 0.2, top-4%: 0.4, top-6.25% and more: 0.5).

    CHOCO's stable step shrinks with the compressor's quality, the share of ||x - x̂||^2 one increment carries: at
    least the kept fraction, far more on model differences, which are heavy-tailed. Measured on the 20-peer digits
    benchmark (benchmarks/bench_choco.py, shards:2, 20 rounds, seeds 0-2): at top-1% a step of 0.05 (5 x the
    fraction) leaves every peer where local training leaves it (MLP 19.7%, logistic regression 19.8%), 0.2 mixes
    (24.6% and 42.2%), 0.5 mixes less and decays with more exchanges; at top-10% 0.5-0.7 learn best and 1 collapses.
    On the pure consensus toy of tests/test_choco.py (no training between exchanges, one coordinate of 60 kept)
    a step of 0.1 already stalls: a swarm whose models stop changing needs a smaller one, which the manifest sets.
    """
    if spec.consensus_step is not None:
        return spec.consensus_step
    if spec.top_k_ratio is not None and spec.top_k_ratio < 1.0:
        return min(0.5, 2.0 * math.sqrt(spec.top_k_ratio))
    return 1.0


def start_version(start: torch.Tensor) -> str:
    """The version token of an estimate still at ``start``: its content hash, the same on every peer."""
    return hashlib.sha256(start.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class _Estimate:
    vec: torch.Tensor
    ver: str
    heard: int  # the sender's round of the increment that made it


@dataclass
class _Step:
    """This exchange's increment, encoded once for every recipient that holds ``base``."""

    base: str
    ver: str
    tensors: dict[str, torch.Tensor]
    desc: dict[str, Any]


class ChocoGossip:
    """The estimates of one node and the encoding of its increments. Thread-safe (one lock)."""

    def __init__(self, spec: CompressionSpec, start: torch.Tensor, *, max_peers: int = 64, max_age: int = 10,
                 seed: int | None = None) -> None:
        if start.dtype != torch.float32 or start.dim() != 1:
            raise ValueError("the initial model must be a flat float32 vector")
        self.spec = spec
        self.numel = start.numel()
        self.max_peers = max_peers
        self.max_age = max_age
        self.stats = CodecStats()
        self._gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self._lock = threading.Lock()
        self._start = start.detach().clone()
        self._start_ver = start_version(self._start)
        self._own = _Estimate(self._start.clone(), self._start_ver, 0)
        self._sent: OrderedDict[str, str] = OrderedDict()  # recipient -> version of our estimate it holds
        self._peers: OrderedDict[str, _Estimate] = OrderedDict()
        self._step: _Step | None = None

    # ------------------------------------------------------------------ sender
    def advance(self, flat: torch.Tensor, round_: int) -> None:
        """One exchange: q = Q(x - x̂_self), x̂_self += q. Call once per share, before `encode` for each recipient."""
        if flat.dtype != torch.float32 or flat.shape != (self.numel,) or flat.device.type != "cpu":
            raise ValueError(f"expected a float32 CPU vector of {self.numel} values")
        with self._lock:
            tensors, layout = compress_vector(flat - self._own.vec, self.spec, "delta", self._gen)
            idx, values = decompress_vector(tensors, layout)
            if idx is None:
                self._own.vec.add_(values)
            else:
                self._own.vec.index_add_(0, idx, values)
            base, ver = self._own.ver, secrets.token_hex(8)
            self._own = _Estimate(self._own.vec, ver, round_)
            self._step = _Step(base, ver, tensors, {**layout_meta(layout), "mode": MODE, "ver": ver, "base": base})

    def encode(self, peer_id: str, meta: Mapping[str, Any]) -> tuple[bytes, str]:
        """The payload of this exchange for ``peer_id`` and its kind: the increment when the peer holds the estimate
        it applies to (or the chain starts at the common initial model), else the estimate in full."""
        with self._lock:
            step = self._step
            if step is None:
                raise RuntimeError("encode before advance")
            if self._sent.get(peer_id) == step.base or step.base == self._start_ver:
                kind, tensors, desc = "delta", step.tensors, step.desc
            else:
                full, layout = compress_vector(self._own.vec, self.spec, "full", self._gen, exact=True)
                kind, tensors = "full", full
                desc = {**layout_meta(layout), "mode": MODE, "ver": step.ver, "base": ""}
            self._sent[peer_id] = step.ver
            self._sent.move_to_end(peer_id)
            while len(self._sent) > 4 * self.max_peers:  # version tokens only: a forgotten peer costs a full send
                self._sent.popitem(last=False)
            payload = lossless_wrap(wire.encode(tensors, meta={**meta, META_KEY: desc}, encoding=ENCODING),
                                    self.spec.lossless)
            self.stats.bytes_raw_sent += 4 * self.numel
            self.stats.bytes_wire_sent += len(payload)
            if kind == "full":
                self.stats.full_sent += 1
            else:
                self.stats.delta_sent += 1
        return payload, kind

    def reset_peer(self, peer_id: str) -> None:
        """``peer_id`` does not hold our estimate (it asked for a resync): the next message to it is full."""
        with self._lock:
            if self._sent.pop(peer_id, None) is not None:
                self.stats.resyncs += 1

    # ------------------------------------------------------------------ receiver
    def receive(self, sender: str, payload: bytes | bytearray | memoryview, max_bytes: int, round_: int) -> dict[str, Any]:
        """Validate an increment (or a full estimate) and apply it to ``sender``'s estimate; its meta.
        Raises WireError, StaleBase when it applies to a version this node does not hold."""
        got = read_payload(payload, self.numel, max_bytes, mode=MODE)
        if got.extras:
            raise wire.WireError("a CHOCO update carries no extra tensors")
        with self._lock:
            held = self._peers.get(sender)
            if got.layout.kind == "full":
                vec = got.values.clone()
            else:
                if held is not None and held.ver == got.base:
                    vec = held.vec.clone()
                elif got.base == self._start_ver:
                    vec = self._start.clone()
                else:
                    self.stats.rejected += 1
                    raise StaleBase(f"increment from {sender} applies to an estimate this node does not hold",
                                    "asking the sender for its full estimate")
                if got.idx is None:
                    vec.add_(got.values)
                else:
                    vec.index_add_(0, got.idx, got.values)
                if not all_finite(vec):
                    self.stats.rejected += 1
                    raise wire.WireError("increment makes the estimate non-finite")
            self._peers[sender] = _Estimate(vec, got.ver, round_)
            self._peers.move_to_end(sender)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
            self.stats.received += 1
            self.stats.bytes_raw_received += 4 * self.numel
            self.stats.bytes_wire_received += memoryview(payload).nbytes
        return got.meta

    def difference(self, sender: str) -> torch.Tensor | None:
        """x̂_sender - x̂_self, or None when this node holds no estimate of ``sender``."""
        with self._lock:
            held = self._peers.get(sender)
            return None if held is None else held.vec - self._own.vec

    def estimate(self, sender: str) -> torch.Tensor | None:
        """A copy of this node's estimate of ``sender``'s model, or None."""
        with self._lock:
            held = self._peers.get(sender)
            return None if held is None else held.vec.clone()

    def own_estimate(self) -> torch.Tensor:
        """A copy of this node's public estimate of its own model (what its neighbours hold of it)."""
        with self._lock:
            return self._own.vec.clone()

    def evict(self, round_: int) -> list[str]:
        """Drop the estimates of peers not heard for more than ``max_age`` rounds; returns them."""
        with self._lock:
            old = [pid for pid, e in self._peers.items() if round_ - e.heard > self.max_age]
            for pid in old:
                del self._peers[pid]
        return old

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Initial model, own estimate and each neighbour's, with versions (uint8 ASCII) and rounds heard."""
        with self._lock:
            out = {"start": self._start.clone(), "own/vec": self._own.vec.clone(), "own/ver": token_tensor(self._own.ver),
                   "own/heard": torch.tensor(self._own.heard, dtype=torch.int64)}
            for pid, e in self._peers.items():
                out[f"peer/{pid}/vec"] = e.vec.clone()
                out[f"peer/{pid}/ver"] = token_tensor(e.ver)
                out[f"peer/{pid}/heard"] = torch.tensor(e.heard, dtype=torch.int64)
            for pid, ver in self._sent.items():
                out[f"sent/{pid}"] = token_tensor(ver)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`; refuses entries that do not fit this model. An empty state leaves a fresh start."""
        if not state:
            return
        start = self._vector(state.get("start"), "start")
        own = _Estimate(self._vector(state.get("own/vec"), "own/vec"), token_str(state.get("own/ver"), "own", _OWNER),
                        _round(state.get("own/heard"), "own"))
        peers: dict[str, dict[str, torch.Tensor]] = {}
        sent: OrderedDict[str, str] = OrderedDict()
        for key, t in state.items():
            if key in ("start", "own/vec", "own/ver", "own/heard"):
                continue
            side, _, rest = key.partition("/")
            if side == "sent" and rest:
                sent[rest] = token_str(t, key, _OWNER)
                continue
            pid, _, name = rest.rpartition("/")
            if side != "peer" or not pid or name not in ("vec", "ver", "heard"):
                raise ValueError(f"CHOCO state has unexpected entry {key!r}")
            peers.setdefault(pid, {})[name] = t
        loaded: OrderedDict[str, _Estimate] = OrderedDict()
        for pid, g in sorted(peers.items(), key=lambda item: _round(item[1].get("heard"), item[0])):
            loaded[pid] = _Estimate(self._vector(g.get("vec"), f"peer/{pid}/vec"), token_str(g.get("ver"), pid, _OWNER),
                                    _round(g.get("heard"), pid))
        with self._lock:
            self._start, self._start_ver, self._own = start, start_version(start), own
            self._peers, self._sent, self._step = loaded, sent, None

    def _vector(self, t: torch.Tensor | None, name: str) -> torch.Tensor:
        if t is None:
            raise ValueError(f"CHOCO state lacks {name!r}")
        if t.dtype != torch.float32 or tuple(t.shape) != (self.numel,) or not all_finite(t):
            raise ValueError(f"CHOCO state {name!r} does not fit a model of {self.numel} values")
        return t.clone()




def _round(t: torch.Tensor | None, where: str) -> int:
    if t is None or t.dtype != torch.int64 or t.numel() != 1:
        raise ValueError(f"CHOCO state {where} lacks the round it was heard")
    return int(t)


class ConsensusStep(AggregatorWrapper):
    """The CHOCO step through the manifest's averaging rule: ``x + gamma * (rule(x, guesses) - x)``.

    The guesses are ``x + (x̂_j - x̂_self)`` (`node.exchange`), so an averaging rule with weights w_j gives
    ``x + gamma * sum_j w_j (x̂_j - x̂_self)``. Training hooks, extras and state are the rule's.
    """

    def __init__(self, inner: Aggregator, gamma: float) -> None:
        super().__init__(inner)
        self.gamma = gamma

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        result = self.inner.aggregate(local, others, current_round)
        result.flat = local.flat + self.gamma * (result.flat - local.flat)
        return result
