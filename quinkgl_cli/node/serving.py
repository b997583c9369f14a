"""The serving model: the model a peer offers at any round, with no end-of-run phase and no extra traffic.

Owns the latest model this peer trained (its own contribution, as it left local training) and the latest model of
each peer that an aggregation of this node used, with their rounds and sample counts, plus the scratch module the
served weights are loaded into. The served model is the mean of the entries at most ``max_age`` rounds old,
weighted by sample count and bounded as FedAvg bounds self-reported counts (``max_weight_ratio``).

Why: a peer's own model after aggregating with the few peers its topology reached this round still leans on its
own data (on label-skewed splits it swings by tens of points between rounds); the average of the latest model of
every peer heard from recently is the single global merge of "A Single Merging Suffices" (2025) done at every round
from models the node already received. When every peer is heard every round it is the round's full average. Only
for averaging rules: under a robust rule (Krum, Median, ...) a plain mean would let in what the rule screens out,
so the served model is then the model the node holds.

When this round's aggregations already used the latest model of every peer the average would hold (a small swarm
whose peers all hear each other every round), the model the node holds is served instead: it was formed from the
same models, with the rule's momentum, and an average of models that each just trained on its own classes swings
more (four label-disjoint peers, nine model families, three seeds: the held model's anytime mean ahead of the
served average's in every one, by 0.1-0.6 points in seven, 2.0 for a BatchNorm CNN and 6.7 for a LayerNorm MLP with
Adam whose served average fell 12.5 points between rounds; benchmarks/LEARNING.md).

Training never reads it: the served model is what evaluation, ``on_round_end``, checkpoints and the final model
show. The final averaging-only exchanges (the end-of-run merge, when a run has one) end it: their models and the
latest ones from the training rounds do not mix (a peer not heard during the merge would bring back its drifted
training model), and the merged model the peer holds is what it serves from then on. Memory: one flat float32 copy per peer heard in the last
``max_age`` rounds, at most ``max_models`` (the most recently heard ones).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quinkgl_cli.strategies.aggregation import bounded_weights, weighted_mean_rows
from quinkgl_cli.strategies.base import PeerUpdate
from quinkgl_cli.tensors import flatten, load_flat

MAX_AGE = 10  # rounds: older latest models are left out (measured in benchmarks/LEARNING.md: 3 and 5 serve worse)
MAX_MODELS = 64  # peers remembered; the least recently heard is forgotten first
PREFIX = "serving."


@dataclass
class _Entry:
    round: int
    flat: torch.Tensor
    samples: int


class ServingModel:
    """See the module docstring. ``enabled`` is False under robust aggregation rules (the held model is served)."""

    def __init__(self, model: nn.Module, enabled: bool, max_weight_ratio: float, max_age: int = MAX_AGE,
                 max_models: int = MAX_MODELS) -> None:
        self.enabled = enabled
        self.max_weight_ratio = max_weight_ratio
        self.max_age = max_age
        self.max_models = max_models
        self._model = model
        self._scratch: nn.Module | None = None
        self._own: _Entry | None = None
        self._peers: dict[str, _Entry] = {}  # insertion order = least recently heard first
        self._unusable_round: int | None = None  # the round whose average evaluated to a non-finite loss
        # A round, the peers its aggregations used, and whether they all came through the poison guard untouched.
        self._heard: tuple[int, set[str], bool] = (0, set(), True)

    def merged(self) -> None:
        """The end-of-run merge began: serve the held model from now on."""
        self.enabled = False
        self._own = None
        self._peers = {}

    def note_own(self, round_: int, samples: int) -> None:
        """The model as local training left it this round (before any aggregation)."""
        if self.enabled:
            self._own = _Entry(round_, flatten(self._model), max(int(samples), 1))
            # Models too old to be served are dropped now, not kept until 64 peers push them out: memory and every
            # checkpoint hold only the peers heard in the last ``max_age`` rounds.
            oldest = round_ - self.max_age
            self._peers = {p: e for p, e in self._peers.items() if e.round >= oldest}

    def note_peers(self, updates: list[PeerUpdate], refused: Sequence[str] = (), current_round: int | None = None,
                   clean: bool = True) -> None:
        """Updates an aggregation used: each becomes its sender's latest model (a newer round wins). The senders of
        updates it ``refused`` (poison, an untrained model, a copy) leave the served average at once, instead of
        being served their older models for ``max_age`` rounds. A round claimed past ``current_round`` counts as
        ``current_round``: a claim of round 1,000,000 would otherwise keep its model served for good. ``clean``:
        the aggregation's poison guard refused and clipped nothing; after one that did, the held model may carry
        what the served mean leaves out, and the round serves the mean."""
        if not self.enabled:
            return
        for peer in refused:
            self._peers.pop(peer, None)
        if current_round is not None and (updates or refused or not clean):
            if self._heard[0] != current_round:
                self._heard = (current_round, set(), True)
            _, heard, was_clean = self._heard
            heard.update(u.peer_id for u in updates)
            self._heard = (current_round, heard, was_clean and clean and not refused)
        for u in updates:
            round_ = u.round if current_round is None else min(u.round, current_round)
            held = self._peers.get(u.peer_id)
            if held is not None and held.round > round_:
                continue
            self._peers.pop(u.peer_id, None)
            self._peers[u.peer_id] = _Entry(round_, u.flat, max(int(u.sample_count), 1))
        while len(self._peers) > self.max_models:
            del self._peers[next(iter(self._peers))]

    def unusable(self, current_round: int) -> None:
        """The average evaluated to a non-finite loss this round: serve the held model until the next round (the
        node's call, which logs it). Every entry is a finite model, yet their mean need not be a working one: a model
        keeping state that averaging breaks (a running variance gone negative) returns NaN while training looks
        healthy."""
        self._unusable_round = current_round

    def model(self, current_round: int) -> nn.Module:
        """The module to serve: the scratch copy holding the served weights, or the node's model when there is
        nothing to average (serving off, or nothing trained and received yet)."""
        entries = self._recent(current_round)
        if not entries:
            return self._model
        if self._scratch is None:
            self._scratch = copy.deepcopy(self._model)
        counts = torch.tensor([float(e.samples) for e in entries], dtype=torch.float64)
        weights = bounded_weights(counts, self.max_weight_ratio).tolist()
        flat = weighted_mean_rows([e.flat for e in entries], weights)
        load_flat(self._scratch, flat)
        return self._scratch

    def _recent(self, current_round: int) -> list[_Entry]:
        if not self.enabled or self._own is None or current_round == self._unusable_round:
            return []
        oldest = current_round - self.max_age
        recent = {peer: e for peer, e in self._peers.items() if e.round >= oldest}
        heard_round, heard, clean = self._heard
        if heard_round == current_round and clean and heard.issuperset(recent):
            return []  # the held model already aggregated every one of them (module docstring)
        return [self._own, *recent.values()]

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``serving.own`` and ``serving.peer.<i>`` flat tensors; JSON with each entry's round, samples, peer id, and
        the peers this round's aggregations used (whether the held model is served)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"own": None, "peers": []}
        if self._own is not None:
            tensors[f"{PREFIX}own"] = self._own.flat
            meta["own"] = {"round": self._own.round, "samples": self._own.samples}
        for i, (peer, e) in enumerate(self._peers.items()):
            tensors[f"{PREFIX}peer.{i}"] = e.flat
            meta["peers"].append({"peer": peer, "round": e.round, "samples": e.samples})
        heard_round, heard, clean = self._heard
        if heard_round:
            meta["heard"] = {"round": heard_round, "peers": sorted(heard), "clean": clean}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> None:
        """Restore what `state_dict` saved; a checkpoint without serving state (older, or serving off) leaves it
        empty. Entries must be finite vectors of this model's size."""
        self._own = None
        self._peers = {}
        self._heard = (0, set(), True)
        if not meta:
            return
        size = flatten(self._model).numel()

        def entry(key: str, info: dict[str, Any]) -> _Entry:
            flat = tensors.get(key)
            if flat is None or flat.dim() != 1 or flat.numel() != size or not bool(torch.isfinite(flat).all()):
                raise ValueError(f"checkpoint serving entry {key} is missing or not a finite vector of the model's size")
            return _Entry(int(info["round"]), flat.to(torch.float32).clone(), max(int(info["samples"]), 1))

        if meta.get("own") is not None:
            self._own = entry(f"{PREFIX}own", meta["own"])
        for i, info in enumerate(meta.get("peers") or []):
            self._peers[str(info["peer"])] = entry(f"{PREFIX}peer.{i}", info)
        heard = meta.get("heard")  # absent from checkpoints before 2026-12-05: the mean is served
        if heard is not None:
            self._heard = (int(heard["round"]), {str(p) for p in heard["peers"]}, bool(heard["clean"]))
