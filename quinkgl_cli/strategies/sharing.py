"""What happens to a node's model between local training and the wire: local DP, then compression; and the
privacy ledger a node reports and checkpoints (local DP's releases, or DP-SGD's accountant under mode dp_sgd).

The node calls, in a round: ``begin_training`` (the model before training), ``end_training`` (sanitize: the node
continues from the noised model), ``encode`` once per recipient, and on the receive side ``receive`` for every
arriving update (even ones it will not aggregate: delta chains must not skip a link) and ``model_of`` when
aggregating. Receiving follows the payload, not this node's settings (``is_compressed``): a peer that sends
uncompressed (the simulator's FedAvg server) and one that compresses can talk to each other. A refused delta (``StaleBase``) is answered with a ``RESYNC_KIND`` message, whose arrival at the
sender calls ``resync``. Counters for logs and round metrics come from ``round_metrics``.

Under ``compression.mode = "choco"`` the update codec is replaced by `strategies.choco.ChocoGossip` (``choco``):
one increment per exchange (``choco.advance``), then ``choco.encode`` per recipient; ``receive`` applies increments to
the senders' estimates and ``model_of`` is not used (the exchange asks ``choco.difference``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quinkgl_cli.manifest.schema import CompressionSpec, PrivacySpec
from quinkgl_cli.strategies.choco import ChocoGossip
from quinkgl_cli.strategies.compression import (
    ENCODING,
    RESYNC_KIND,
    Encoded,
    StaleBase,
    UpdateCodec,
    is_compressed,
    ratio,
)
from quinkgl_cli.strategies.dp_accountant import SampleAccountant
from quinkgl_cli.strategies.privacy import LocalDP

__all__ = ["ENCODING", "RESYNC_KIND", "SharingPipeline", "StaleBase", "is_compressed"]


class SharingPipeline:
    """Local DP and the update codec of one node; ``compress_sends`` when the swarm's manifest compresses.

    ``noise_seed`` makes DP noise and QSGD rounding reproducible (the simulator); a daemon leaves it None so they
    come from the operating system's secure source: noise that others can predict protects nothing. ``dp_mask``
    (`tensors.trainable_mask`) limits DP to the entries that train. Vectors in and out are CPU tensors.
    """

    def __init__(self, compression: CompressionSpec, privacy: PrivacySpec, numel: int, noise_seed: int | None = None,
                 max_peers: int = 64, dp_mask: torch.Tensor | None = None, start: torch.Tensor | None = None,
                 sample_dp: SampleAccountant | None = None) -> None:
        self.codec = UpdateCodec(compression, numel, max_peers=max_peers, seed=noise_seed)
        self.choco: ChocoGossip | None = None
        if compression.mode == "choco":
            if start is None:
                raise ValueError("CHOCO gossip needs the initial model its estimates start from")
            self.choco = ChocoGossip(compression, start, max_peers=max_peers, seed=noise_seed)
        self.compress_sends = compression.enabled
        self.dp = LocalDP(privacy, seed=noise_seed)
        # DP-SGD's accountant (privacy mode dp_sgd): the trainer charges it, this reports and checkpoints it.
        self.sample_dp = sample_dp
        self._dp_mask = dp_mask
        self.sharing_stopped = False  # set for good once the privacy budget cannot afford a round
        self._start: torch.Tensor | None = None
        self._mark = self.codec.stats.snapshot()

    # ------------------------------------------------------------------ local DP
    def begin_training(self, flat: torch.Tensor) -> None:
        if self.dp.enabled:
            self._start = flat.clone()

    def end_training(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The model to continue from (noised), or None to keep the trained one (DP off, or sharing stopped)."""
        if not self.dp.enabled or self.sharing_stopped:
            return None
        if self._start is None:
            raise RuntimeError("end_training without begin_training")
        start, self._start = self._start, None
        if self.dp.exhausted:
            self.sharing_stopped = True  # this round's training is not released: nothing may be shared any more
            return None
        return self.dp.sanitize(start, flat, self._dp_mask)

    # ------------------------------------------------------------------ compression
    def encode(self, peer_id: str, flat: torch.Tensor, extras: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Encoded:
        return self.codec.encode(peer_id, flat, extras=extras, meta=meta)

    @staticmethod
    def is_compressed(payload: bytes | bytearray | memoryview) -> bool:
        return is_compressed(payload)

    def receive(self, sender: str, payload: bytes | bytearray | memoryview, max_bytes: int, round_: int = 0) -> dict[str, Any]:
        """Apply an update to ``sender``'s reconstruction (or CHOCO estimate) and return its meta; raises WireError
        (StaleBase: resync)."""
        if self.choco is not None:
            return self.choco.receive(sender, payload, max_bytes, round_)
        return self.codec.receive(sender, payload, max_bytes).meta

    def model_of(self, sender: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        return self.codec.model_of(sender)

    def resync(self, peer_id: str) -> None:
        if self.choco is not None:
            self.choco.reset_peer(peer_id)
        else:
            self.codec.reset_peer(peer_id)

    # ------------------------------------------------------------------ metrics and checkpoints
    def round_metrics(self) -> dict[str, Any]:
        """Counters since the previous call (compression) and the cumulative privacy spent."""
        out: dict[str, Any] = {}
        now = self._stats()
        if self.compress_sends or now[6] or now[7]:  # this node compresses, or receives compressed updates
            d = [a - b for a, b in zip(now, self._mark, strict=True)]
            raw_sent, wire_sent, raw_recv, wire_recv, full, delta, received, rejected, resyncs = d
            out.update(compressed_bytes_sent=wire_sent, compressed_bytes_received=wire_recv,
                       compression_ratio_sent=round(ratio(raw_sent, wire_sent), 2),
                       compression_ratio_received=round(ratio(raw_recv, wire_recv), 2),
                       full_updates_sent=full, delta_updates_sent=delta, updates_rejected=rejected, resyncs=resyncs)
        self._mark = now
        out.update(self.dp.metrics())
        if self.sample_dp is not None:
            out.update(self.sample_dp.metrics())
        if self.sharing_stopped:
            out["sharing_stopped"] = True
        return out

    def _stats(self) -> tuple[int, ...]:
        return (self.choco.stats if self.choco is not None else self.codec.stats).snapshot()

    @staticmethod
    def log_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
        """``round_metrics`` as log fields: delta in %g (fixed-point would print 1e-05 as 0.0000)."""
        return {k: (f"{v:g}" if k == "dp_delta" else v) for k, v in metrics.items()}

    def budget_fields(self) -> dict[str, Any]:
        """What the ``dp-budget-exhausted`` line says: the releases or steps taken and the epsilon they spent."""
        if self.sample_dp is not None:
            return {"steps": self.sample_dp.metrics()["dp_steps"], "epsilon_spent": round(self.sample_dp.spent(), 4),
                    "delta": self.sample_dp.delta, "total": self.sample_dp.target,
                    "hint": "this node no longer trains or shares its model"}
        eps, delta = self.dp.spent()
        return {"releases": self.dp.releases, "epsilon_spent": round(eps, 4), "delta": delta,
                "total": self.dp.spec.dp_total_epsilon, "hint": "this node no longer shares its model"}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"dp.{k}": v for k, v in self.dp.state_dict().items()}
        if self.sample_dp is not None:
            out.update({f"dpsgd.{k}": v for k, v in self.sample_dp.state_dict().items()})
        out["sharing_stopped"] = torch.tensor(self.sharing_stopped)
        out.update({f"codec.{k}": v for k, v in self.codec.state_dict().items()})
        if self.choco is not None:
            out.update({f"choco.{k}": v for k, v in self.choco.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        dp_state = {k[3:]: v for k, v in state.items() if k.startswith("dp.")}
        if dp_state or self.dp.enabled:  # a DP node must never restart with its budget unspent
            self.dp.load_state_dict(dp_state)
        sgd_state = {k[6:]: v for k, v in state.items() if k.startswith("dpsgd.")}
        if self.sample_dp is not None:
            self.sample_dp.load_state_dict(sgd_state)  # refuses a checkpoint without it: the budget stays spent
        elif sgd_state:
            raise ValueError("the checkpoint holds a DP-SGD budget, and this manifest's privacy mode is not dp_sgd")
        stopped = state.get("sharing_stopped")
        self.sharing_stopped = bool(stopped) if stopped is not None else False
        self.codec.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("codec.")})
        choco = {k[6:]: v for k, v in state.items() if k.startswith("choco.")}
        if self.choco is not None:
            self.choco.load_state_dict(choco)
        elif choco:
            raise ValueError("the checkpoint holds CHOCO estimates but this swarm does not run CHOCO gossip")
        self._mark = self._stats()
