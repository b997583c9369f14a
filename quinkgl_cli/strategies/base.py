"""Interfaces of aggregation and topology strategies, as the node calls them.

Aggregators work on flat float32 vectors (`quinkgl_cli.tensors.flatten`) so one vectorized pass serves
any model. Strategies that touch training (FedProx, Scaffold) do it through the training hooks below.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quinkgl_cli.manifest.strategy_params import Params


@dataclass
class PeerUpdate:
    """One model contribution to an aggregation (the local model is one, with ``is_local=True``)."""

    peer_id: str
    round: int
    flat: torch.Tensor
    sample_count: int
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. label entropy
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. Scaffold control variate
    is_local: bool = False


@dataclass
class AggregationResult:
    flat: torch.Tensor
    used: list[str]  # peer ids whose updates shaped the result
    rejected: list[str] = field(default_factory=list)
    note: str = ""  # e.g. "fell back to Median: 3 updates < 2f+3"
    # Averaging rules: the updates as they were combined (after the poison guard, so clipped ones clipped). The
    # node's serving model averages these, never the raw updates the guard bounded.
    combined: list[PeerUpdate] = field(default_factory=list)


class Aggregator(ABC):
    name: str

    def __init__(self, params: Params, byzantine_f: int = 0) -> None:
        self.params = params
        self.byzantine_f = byzantine_f

    @abstractmethod
    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        """Combine the local model with what peers sent. Never raises for too few updates: falls back."""

    # Training hooks: defaults do nothing.
    def extras_to_send(self) -> dict[str, torch.Tensor]:
        """Tensors to ship alongside the model (Scaffold's control variate)."""
        return {}

    def begin_training(self, model: nn.Module, lr: float) -> None:
        """Called before local training with the model as aggregated."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """Extra term added to the local loss (FedProx's proximal term)."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Adjust gradients after backward, before the optimizer step (Scaffold's correction)."""

    def end_training(self, model: nn.Module, steps: int, lr: float) -> None:
        """Called after local training (Scaffold updates its control variate here)."""

    def begin_consensus(self) -> None:
        """The end-of-run averaging-only exchanges begin: from now on only pull the peers together (momentum
        rules drop their velocity)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)}")


class AggregatorWrapper(Aggregator):
    """An aggregator around another (``inner``): its training hooks, extras, merge signal and state are the inner
    rule's unless a subclass says otherwise, and so are ``name`` and ``params`` (what logs and the manifest call
    it). Subclasses change ``aggregate``."""

    def __init__(self, inner: Aggregator) -> None:
        super().__init__(inner.params, inner.byzantine_f)
        self.inner = inner
        self.name = inner.name

    def extras_to_send(self) -> dict[str, torch.Tensor]:
        return self.inner.extras_to_send()

    def begin_training(self, model: nn.Module, lr: float) -> None:
        self.inner.begin_training(model, lr)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        return self.inner.loss_term(model)

    def after_backward(self, model: nn.Module) -> None:
        self.inner.after_backward(model)

    def end_training(self, model: nn.Module, steps: int, lr: float) -> None:
        self.inner.end_training(model, steps, lr)

    def begin_consensus(self) -> None:
        self.inner.begin_consensus()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


class Topology(ABC):
    name: str

    def __init__(self, params: Params, self_id: str, rng: random.Random) -> None:
        self.params = params
        self.self_id = self_id
        self.rng = rng

    @abstractmethod
    def select(self, peers: Sequence[str], round_idx: int) -> list[str]:
        """Choose this round's recipients among the currently known ``peers``."""

    def observe_fingerprint(self, peer_id: str, fingerprint: dict[str, Any]) -> None:
        """A peer's data fingerprint arrived (AffinityTopology uses it)."""

    def record_outcome(self, peer_id: str, quality: float) -> None:
        """How useful a peer's last update was (collaboration history), in [0, 1]."""

    def observe_aggregation(self, local: PeerUpdate, others: Sequence[PeerUpdate], result: AggregationResult) -> None:
        """One aggregation's inputs and result, given once per aggregation. Topologies that keep a collaboration
        history grade every sender from it (AffinityTopology: ``topology.contribution_qualities``) and record the
        grades through ``record_outcome``; the others ignore it."""

    def control_messages(self, round_idx: int) -> list[tuple[str, str, dict[str, Any]]]:
        """(peer_id, kind, body) messages the topology wants sent this round (Cyclon shuffles)."""
        return []

    def on_control(self, sender: str, kind: str, body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """Handle a control message addressed to the topology; may return replies."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
