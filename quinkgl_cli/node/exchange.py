"""The exchange: what this node sends, to whom, and what a received update decodes to.

Owns the model's shared tensor specs and the receive size limit, the sharing pipeline (local DP and per-peer delta
compression, `strategies.sharing`) and the topology (who to send to, its control messages, fingerprints it is
told). `share` is the one send path and `decode` the one place an incoming update becomes a flat vector (under
CHOCO gossip, `strategies.choco`: the guess ``x + (x̂_sender - x̂_self)`` the consensus step averages). An
optional ``tamper`` (the simulator's attackers) replaces the weights for the duration of a send; the node's own
model stays honest. Checkpointed: the sharing pipeline's and the topology's state (`state_dict`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from quinkgl_cli import wire
from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.copies import CopyGuard, digest
from quinkgl_cli.node.gossipgraph import GOSSIP_TO_KEY, GraphWatch, gossip_to
from quinkgl_cli.node.nodelog import FirstPerPeer, NodeLog
from quinkgl_cli.strategies.aggregation import LABEL_ENTROPY_KEY
from quinkgl_cli.strategies.base import Aggregator, PeerUpdate, Topology
from quinkgl_cli.strategies.dp_accountant import SampleAccountant
from quinkgl_cli.strategies.fingerprint import MESSAGE_KIND as FINGERPRINT_KIND
from quinkgl_cli.strategies.sharing import ENCODING as COMPRESSED_ENCODING
from quinkgl_cli.strategies.sharing import RESYNC_KIND, SharingPipeline, StaleBase
from quinkgl_cli.tensors import (
    TensorSpec,
    all_finite,
    flatten,
    float_buffers,
    is_running_variance,
    load_flat,
    shared_specs,
    trainable_mask,
    variance_mask,
)
from quinkgl_cli.transport.base import ModelReceived, OutgoingUpdate, Transport

# Cap on a self-reported sample count before the aggregator's own bound (max_weight_ratio) applies: keeps
# arithmetic sane whatever a peer claims (the published package let one peer claim 2**32 samples).
MAX_REPORTED_SAMPLES = 1 << 31
EXTRA_PREFIX = "extra."
# A received payload decoded and checked: the model's flat vector, the extras (`EXTRA_PREFIX`), the header's meta
_Decoded = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]

Tamper = Callable[[torch.Tensor], torch.Tensor]  # honest flat weights -> the weights actually sent


def build_sharing(manifest: Manifest, model: nn.Module, specs: Sequence[TensorSpec], noise_seed: int | None,
                  sample_dp: SampleAccountant | None = None) -> SharingPipeline:
    """The node's sharing pipeline; refuses local DP for a model with floating-point buffers (they would leak)."""
    dp_mask = None
    if manifest.privacy.dp_epsilon is not None:
        buffers = float_buffers(model)
        if buffers:
            more = f" and {len(buffers) - 3} more" if len(buffers) > 3 else ""
            raise NodeConfigError(
                f"local DP cannot cover the model's floating-point buffers ({', '.join(buffers[:3])}{more}): "
                "they are computed from the training data and would be shared without noise",
                "use GroupNorm or LayerNorm instead of BatchNorm (as Opacus requires), register constant buffers "
                "with persistent=False, or turn DP off")
        dp_mask = trainable_mask(model)
    return SharingPipeline(manifest.compression, manifest.privacy, sum(s.numel for s in specs),
                           noise_seed=noise_seed, dp_mask=dp_mask, start=flatten(model), sample_dp=sample_dp)


class Exchange:
    def __init__(self, node_id: str, manifest: Manifest, model: nn.Module, transport: Transport,
                 aggregator: Aggregator, topology: Topology, graph: GraphWatch, log: NodeLog,
                 max_update_bytes: int | None, noise_seed: int | None, tamper: Tamper | None = None,
                 sample_dp: SampleAccountant | None = None) -> None:
        self.node_id = node_id
        self.manifest = manifest
        self.model = model
        self.transport = transport
        self.aggregator = aggregator
        self.topology = topology
        self.graph = graph
        self._log = log
        self.specs: list[TensorSpec] = wire.on_wire(shared_specs(model))  # what is sent, and checked on receipt
        # A running variance below zero is no trained model's: averaged in, it turns every evaluation into NaN
        # (BatchNorm takes its square root), while training, on batch statistics, carries on as if nothing happened.
        self._variances = variance_mask(model)
        self.max_update_bytes = max_update_bytes or wire.max_blob_bytes(self.specs) * 2
        # What a payload's decoding depends on besides its bytes: two receivers with equal keys decode the same
        # bytes to the same values and refuse the same bytes alike (`_decoded`).
        self._decode_key = (tuple(self.specs), len(self.specs) + 64, self.max_update_bytes)
        self.sharing = build_sharing(manifest, model, self.specs, noise_seed, sample_dp)
        self.tamper = tamper
        # Received updates that are copies, echoes or replays (`node.copies`); rounds kept: as far back as an update
        # may still be used, and two more.
        self.copies = CopyGuard(manifest.training.max_staleness + 2)
        self.label_entropy: float | None = None  # rides on every update when the manifest allows fingerprints
        self._sharing_stop_logged = False
        self._messages_dropped = FirstPerPeer()  # control messages reported dropped, per sender and kind
        dp = self.sharing.dp
        if dp.enabled:
            spec = manifest.privacy
            log(logging.INFO, "dp-enabled", epsilon_per_round=spec.dp_epsilon, delta=spec.dp_delta,
                clip_norm=spec.dp_clip_norm, sigma=round(dp.sigma, 6), total_epsilon=spec.dp_total_epsilon,
                affordable_rounds=dp.max_releases)
        if sample_dp is not None and manifest.privacy.dp_sgd is not None:
            sgd = manifest.privacy.dp_sgd
            log(logging.INFO, "dp-sgd-enabled", total_epsilon=sgd.epsilon, delta=sgd.delta, clip_norm=sgd.clip_norm,
                sampling=sgd.sampling, sampling_rate=round(sample_dp.sampling_rate, 6),
                noise_multiplier=round(sample_dp.noise_multiplier, 4), affordable_steps=sample_dp.max_steps,
                spent=round(sample_dp.spent(), 4))

    # ------------------------------------------------------------------ send path
    def encode_update(self, round_: int, samples: int, step: int = 0, targets: Sequence[str] = ()) -> OutgoingUpdate:
        """The one place the outgoing (uncompressed) update is built."""
        state = self.model.state_dict()
        tensors: dict[str, torch.Tensor] = {s.name: state[s.name].to(s.dtype) for s in self.specs}
        for name, t in self.aggregator.extras_to_send().items():
            tensors[EXTRA_PREFIX + name] = t
        meta = self._meta(step, targets)
        payload = wire.encode(tensors, meta=meta)
        return OutgoingUpdate(round=round_, payload=payload, sample_count=samples, meta=meta)

    def _meta(self, step: int, targets: Sequence[str]) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": step}
        if self.label_entropy is not None:
            meta[LABEL_ENTROPY_KEY] = self.label_entropy
        if targets:
            meta[GOSSIP_TO_KEY] = gossip_to(targets)
        return meta

    def share(self, round_: int, samples: int, known: Sequence[str], step: int = 0,
              to: Sequence[str] | None = None) -> list[str]:
        """Send the current model to the peers the topology picks among ``known`` (or to those of ``to`` that are
        known: a driver directing the send); returns them. Never blocks."""
        if self.tamper is None:
            return self._share(round_, samples, known, step, to)
        honest = flatten(self.model)
        load_flat(self.model, self.tamper(honest))
        try:
            return self._share(round_, samples, known, step, to)
        finally:
            load_flat(self.model, honest)

    def _share(self, round_: int, samples: int, known: Sequence[str], step: int, to: Sequence[str] | None) -> list[str]:
        peers = sorted(known)
        if not peers:
            return []
        if self.sharing.sharing_stopped:
            if not self._sharing_stop_logged:
                self._sharing_stop_logged = True
                self._log(logging.WARNING, "dp-budget-exhausted", **self.sharing.budget_fields())
            return []
        known_set = set(peers)
        try:
            chosen = self.topology.select(peers, round_) if to is None else [p for p in to if p in known_set]
            targets = [p for p in chosen if p != self.node_id]
        except Exception as exc:
            self._log(logging.ERROR, "topology-failed", error=f"{type(exc).__name__}: {exc}")
            return []
        for peer_id, kind, body in self.topology.control_messages(round_):
            self.transport.send_message(peer_id, kind, body)
        if not targets:
            return []
        self.graph.record_sends(targets, round_)
        if self.sharing.compress_sends:
            return self._share_compressed(round_, samples, targets, step)
        update = self.encode_update(round_, samples, step, targets)
        self.copies.note_own(round_, update.payload)
        for peer_id in targets:
            self.transport.send_model(peer_id, update)
        self._log(logging.DEBUG, "shared", to=targets, bytes=len(update.payload), step=step)
        return targets

    def _share_compressed(self, round_: int, samples: int, targets: list[str], step: int) -> list[str]:
        """Each recipient gets the delta against what it holds from us (strategies.compression)."""
        flat = flatten(self.model)
        extras = self.aggregator.extras_to_send()
        meta = self._meta(step, targets)
        if self.sharing.choco is not None:
            return self._share_choco(round_, samples, targets, flat, meta)
        sizes = []
        for peer_id in targets:
            enc = self.sharing.encode(peer_id, flat, extras, meta)
            self.transport.send_model(peer_id, OutgoingUpdate(round=round_, payload=enc.payload, sample_count=samples,
                                                              encoding=COMPRESSED_ENCODING, meta=meta))
            sizes.append(enc.wire_bytes)
        self._log(logging.DEBUG, "shared", to=targets, bytes=sum(sizes), step=step, compressed=True)
        return targets

    def _share_choco(self, round_: int, samples: int, targets: list[str], flat: torch.Tensor,
                     meta: dict[str, Any]) -> list[str]:
        """One CHOCO increment for every recipient (its estimate in full to one that does not hold it)."""
        choco = self.sharing.choco
        assert choco is not None
        for peer_id in choco.evict(round_):
            self._log(logging.INFO, "choco-estimate-dropped", peer=peer_id, hint="not heard for too long")
        choco.advance(flat, round_)
        sizes = []
        for peer_id in targets:
            payload, _ = choco.encode(peer_id, meta)
            self.transport.send_model(peer_id, OutgoingUpdate(round=round_, payload=payload, sample_count=samples,
                                                              encoding=COMPRESSED_ENCODING, meta=meta))
            sizes.append(len(payload))
        self._log(logging.DEBUG, "shared", to=targets, bytes=sum(sizes), step=meta["step"], compressed=True)
        return targets

    # ------------------------------------------------------------------ receive path
    def receive_compressed(self, update: ModelReceived, drop: Callable[[str, int, str], None]) -> dict[str, Any] | None:
        """Apply a compressed update to the sender's reconstruction; its meta, or None when dropped (``drop``)."""
        try:
            return self.sharing.receive(update.sender, update.payload, self.max_update_bytes, update.round)
        except StaleBase as exc:
            drop(update.sender, update.round, exc.message)
            self.transport.send_message(update.sender, RESYNC_KIND, {"round": update.round})
        except Exception as exc:
            drop(update.sender, update.round, f"{type(exc).__name__}: {exc}")
        return None

    def copy_refusal(self, update: ModelReceived, current_round: int) -> str | None:
        """Why a full-weight ``update`` carries nothing new (a copy, an echo, a replay: `node.copies`), or None;
        None for a compressed one (deltas are not screened)."""
        if update.encoding == COMPRESSED_ENCODING:
            return None
        self.copies.prune(current_round)
        return self.copies.refusal(update.sender, update.round, update.digest or digest(update.payload))

    def decode(self, msg: ModelReceived) -> PeerUpdate:
        """The one place an incoming update becomes a flat vector: decompression hooks in here. Raises on bad input."""
        samples = int(msg.sample_count)
        if msg.encoding == COMPRESSED_ENCODING:
            held = self._held(msg.sender)
            if held is None:
                raise ValueError("no reconstructed model or estimate for this sender (its state was evicted)")
            flat, extras = held
            if self.sharing.choco is None:  # the sender's own model, rebuilt: screened as if it came whole
                self._check_variances(flat)
            if samples <= 0:
                raise ValueError(f"sample count {samples} is not positive")
            return PeerUpdate(peer_id=msg.sender, round=msg.round, flat=flat,
                              sample_count=min(samples, MAX_REPORTED_SAMPLES), meta=dict(msg.meta), extras=extras)
        flat, extras, meta = self._decoded(msg)
        if samples <= 0:
            raise ValueError(f"sample count {samples} is not positive")
        return PeerUpdate(peer_id=msg.sender, round=msg.round, flat=flat, sample_count=min(samples, MAX_REPORTED_SAMPLES),
                          meta={**msg.meta, **meta}, extras=extras)

    def _decoded(self, msg: ModelReceived) -> _Decoded:
        """The payload's model vector, extras and header meta, checked; this receiver's own copies.

        Recipients in one process of the same payload object (the memory transport's, `ModelReceived.shared`)
        decode it once: the first leaves its checked result in the slot and every one, the first included, gets a
        copy, so none can change what another aggregates. Bytes that fail a check are not kept: each recipient
        decodes them again and refuses them with the same error."""
        slot = msg.shared
        if slot is not None and slot.key == self._decode_key:
            return _copied(cast(_Decoded, slot.value))
        decoded = self._decode_payload(msg.payload)
        if slot is None:
            return decoded
        if slot.key is None:
            slot.key, slot.value = self._decode_key, decoded
        return _copied(decoded)

    def _decode_payload(self, payload: bytes | bytearray) -> _Decoded:
        tensors, meta = wire.decode(payload, max_entries=len(self.specs) + 64, max_bytes=self.max_update_bytes)
        model_tensors = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
        extras = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
        wire.check_against(model_tensors, self.specs, finite=False)
        for name, t in extras.items():
            wire.check_finite(name, t)
        flat = (torch.cat([_as_float32(model_tensors[s.name].reshape(-1)) for s in self.specs])
                if self.specs else torch.empty(0))
        if not all_finite(flat):  # one check for the whole model; the entries are searched only to name the culprit
            for s in self.specs:
                wire.check_finite(s.name, model_tensors[s.name])
        self._check_variances(flat)
        return flat, extras, meta

    def _check_variances(self, flat: torch.Tensor) -> None:
        """Refuse a model vector with a negative running variance, naming the entry that holds it."""
        if self._variances is None or not bool((flat[self._variances] < 0).any()):
            return
        for spec, part in zip(self.specs, torch.split(flat, [s.numel for s in self.specs]), strict=True):
            if is_running_variance(spec.name) and bool((part < 0).any()):
                raise ValueError(f"{spec.name} holds a negative variance")

    def _held(self, sender: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """What a compressed update stands for: the reconstructed model, or under CHOCO the guess of the sender's
        model from estimates, ``x + (x̂_sender - x̂_self)`` (both applied on arrival, `receive_compressed`)."""
        if self.sharing.choco is None:
            return self.sharing.model_of(sender)
        diff = self.sharing.choco.difference(sender)
        return None if diff is None else (flatten(self.model) + diff, {})

    def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        """A control message: a compression resync request, a peer's fingerprint, or the topology's own."""
        if kind == RESYNC_KIND:
            self.sharing.resync(sender)
            self._log(logging.INFO, "compression-resync", peer=sender, hint="next update to it carries full weights")
            return
        try:
            if kind == FINGERPRINT_KIND:
                self.topology.observe_fingerprint(sender, dict(body))
                return
            for peer_id, reply_kind, reply in self.topology.on_control(sender, kind, dict(body)):
                self.transport.send_message(peer_id, reply_kind, reply)
        except Exception as exc:
            # Once per peer and kind at WARNING: control messages are not rate-limited for trusted peers, and a
            # member sending malformed ones made a WARNING line each (thousands a second are within its reach).
            self._log(self._messages_dropped.level(sender, kind), "message-dropped", peer=sender, kind=kind,
                      reason=f"{type(exc).__name__}: {exc}")

    def forget(self, sender: str) -> None:
        """``sender`` left: which of its messages were reported dropped is forgotten (keys come and go)."""
        self._messages_dropped.forget(sender)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``sharing.*`` and ``topology.*`` tensors, and the topology's JSON state."""
        tensors = {f"sharing.{k}": v for k, v in self.sharing.state_dict().items()}
        topo_json: dict[str, Any] = {}
        for key, value in self.topology.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"topology.{key}"] = value.detach().cpu().contiguous()
            else:
                topo_json[key] = value
        return tensors, topo_json

    def load_state_dict(self, tensors: dict[str, torch.Tensor], topology_json: dict[str, Any]) -> None:
        topo = dict(topology_json)
        topo.update({k[len("topology."):]: v for k, v in tensors.items() if k.startswith("topology.")})
        self.topology.load_state_dict(topo)
        self.sharing.load_state_dict({k[len("sharing."):]: v for k, v in tensors.items() if k.startswith("sharing.")})


def _copied(decoded: _Decoded) -> _Decoded:
    flat, extras, meta = decoded
    atomic = all(v is None or isinstance(v, str | int | float) for v in meta.values())
    return (flat.clone(), {k: v.clone() for k, v in extras.items()}, dict(meta) if atomic else copy.deepcopy(meta))


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)
