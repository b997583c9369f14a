"""Byzantine peers for the simulator: an honest node whose outgoing model, or training data, is corrupted.

The attacker trains and aggregates like everyone else; only what it shares is corrupted. Model attacks are the
node's injected ``tamper`` policy: its exchange swaps the model's weights for the malicious ones while it encodes
and sends them and restores them afterwards, so they go through exactly the node's own send path (compression,
privacy, wire). The data attack changes only the attacker's training loader; its model is then shared as is.

The crude attacks:

- ``signflip``: every shared weight negated and amplified by SIGNFLIP_FACTOR, so one attacker outweighs the honest
  models it is averaged with (a plain negation is mostly absorbed by an average);
- ``gaussian``: the weights replaced by N(0, GAUSSIAN_STD^2) noise;
- ``scale``: the weights multiplied by SCALE_FACTOR.

The attacks of the robust-aggregation literature, as a gossip attacker can run them: it knows what an honest peer
knows, the models its partners sent it (`Eavesdrop`: those of its last aggregation, its fellow attackers' left out,
as colluding attackers would) and its own honestly trained model, not every honest model of the round as the
papers assume. Models, not gradients, cross the network, so the gradient attacks are applied to models:

- ``alie`` ("A little is enough", Baruch et al. 2019): the per-coordinate mean of the models it knows minus
  ALIE_Z standard deviations. The paper's z for n peers and f attackers (`alie_z`) is 0.13 for 2 of 20 and aims to
  stay inside the spread a median or Krum accepts; averaging with distance and direction screens accepts more, so
  the simulator uses a fixed ALIE_Z = 1.0. Before its first aggregation the attacker knows only its own model and
  sends it.
- ``ipm`` (inner product manipulation, Xie et al. 2020): the paper sends -epsilon times the honest gradients'
  mean. A model sent as such would point against every model (the direction check refuses it); the honest
  gradient's counterpart in model exchange is the honest mean's movement between rounds, so the attacker sends its
  own honest model moved IPM_EPSILON times that movement backwards: ``w - IPM_EPSILON * (mean_t - mean_{t-1})``,
  with mean_t the mean of the models it knew at its last aggregation (its own included). Large epsilon (IPM_EPSILON
  = 4, beyond the (n - f) / f = 3 at which one attacker in a gossip aggregation of four models turns the average's
  movement around), rather than the paper's 0.1 aimed at Krum. Honest until it has seen two aggregations.
- ``labelflip`` (data poisoning): the attacker trains honestly on its own data with every label y replaced by
  C - 1 - y (C classes of the training set) and shares that model untouched (`FlippedLabels`).

And a baseline rather than an attack: ``silent`` members train and take the models sent to them but send none (a
free rider, or an attacker whose every model is refused): what the swarm loses with their data and with the sends
spent on them, whatever a defence does. An attack costing no more than ``silent`` is stopped as well as screening
can stop it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from statistics import NormalDist
from typing import Any

import torch

from quinkgl_cli.errors import UsageError
from quinkgl_cli.strategies.base import AggregationResult, Aggregator, AggregatorWrapper, PeerUpdate

ATTACKS = ("signflip", "gaussian", "scale", "alie", "ipm", "labelflip", "silent")
MODEL_ATTACKS = ("signflip", "gaussian", "scale")  # from the attacker's own weights alone
KNOWING_ATTACKS = ("alie", "ipm")  # from the models the attacker received (`Eavesdrop`)
DATA_ATTACKS = ("labelflip",)  # the attacker's training data changed, its model shared as is
SILENT = "silent"  # sends nothing: the baseline for the members an attack costs
SIGNFLIP_FACTOR = 4.0
GAUSSIAN_STD = 1.0
SCALE_FACTOR = 100.0
ALIE_Z = 1.0
IPM_EPSILON = 4.0


def parse_attackers(text: str | None) -> tuple[int, str]:
    """``COUNT:KIND`` (e.g. ``4:signflip``) or ``COUNT`` (signflip) into (count, kind)."""
    if text is None or not text.strip():
        return 0, "signflip"
    count_text, _, kind = text.strip().partition(":")
    kind = kind.strip().lower() or "signflip"
    hint = f"write it as COUNT:KIND with KIND one of {', '.join(ATTACKS)} (e.g. 4:signflip)"
    try:
        count = int(count_text)
    except ValueError:
        raise UsageError(f"--attackers {text!r}: {count_text!r} is not a number of peers", hint) from None
    if count < 0:
        raise UsageError(f"--attackers {text!r}: the count must not be negative", hint)
    if kind not in ATTACKS:
        raise UsageError(f"--attackers {text!r}: unknown attack {kind!r}", hint)
    return count, kind


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z for ``f`` attackers among ``n`` peers: the quantile that leaves ``n - s`` of them, with
    s = floor(n / 2 + 1) - f supporters needed, on the attackers' side."""
    s = n // 2 + 1 - f
    return NormalDist().inv_cdf((n - s) / n)


def corrupt(kind: str, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if kind == "signflip":
        return flat * -SIGNFLIP_FACTOR
    if kind == "gaussian":
        return torch.randn(flat.shape, generator=generator, dtype=torch.float32) * GAUSSIAN_STD
    if kind == "scale":
        return flat * SCALE_FACTOR
    raise ValueError(f"unknown attack {kind!r}")


class Eavesdrop(AggregatorWrapper):
    """The attacker's own aggregation rule, run unchanged, noting what it learns of the honest models: at each
    aggregation the flat models its partners sent (``colluders`` left out) and the mean of those and its own."""

    def __init__(self, inner: Aggregator, colluders: frozenset[str]) -> None:
        super().__init__(inner)
        self.colluders = colluders
        self.received: list[torch.Tensor] = []  # the honest models of the last aggregation
        self.means: list[torch.Tensor] = []  # the honest mean of the last two aggregations, oldest first

    def aggregate(self, local: PeerUpdate, others: Sequence[PeerUpdate], current_round: int) -> AggregationResult:
        honest = [u.flat.detach().clone() for u in others if u.peer_id not in self.colluders]
        if honest:
            self.received = honest
            self.means = [*self.means[-1:], torch.stack([local.flat.detach(), *honest]).mean(dim=0)]
        return self.inner.aggregate(local, others, current_round)


def alie(own: torch.Tensor, received: Sequence[torch.Tensor], z: float = ALIE_Z) -> torch.Tensor:
    """mean - z * std per coordinate over ``own`` and ``received`` (``own`` alone: itself)."""
    if not received:
        return own
    known = torch.stack([own, *received])
    return known.mean(dim=0) - z * known.std(dim=0, unbiased=False)


def ipm(own: torch.Tensor, means: Sequence[torch.Tensor], epsilon: float = IPM_EPSILON) -> torch.Tensor:
    """``own`` moved ``epsilon`` times the honest mean's last movement backwards (fewer than two means: ``own``)."""
    if len(means) < 2:
        return own
    return own - epsilon * (means[-1] - means[-2])


def tamper_for(kind: str, seed: int, heard: Eavesdrop | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weights an attacker of ``kind`` sends in place of its honest ``flat`` ones (`NodePolicies.tamper`);
    ``heard``: the attacker's `Eavesdrop`, which ``alie`` and ``ipm`` need."""
    if kind in MODEL_ATTACKS:
        generator = torch.Generator().manual_seed(seed)
        return lambda flat: corrupt(kind, flat, generator)
    if kind in KNOWING_ATTACKS:
        if heard is None:
            raise ValueError(f"attack {kind!r} needs the attacker's Eavesdrop")
        if kind == "alie":
            return lambda flat: alie(flat, heard.received)
        return lambda flat: ipm(flat, heard.means)
    raise ValueError(f"attack {kind!r} does not tamper with the model")


class FlippedDataset:
    """``dataset`` with every label y (item 1) read as ``classes - 1 - y``."""

    def __init__(self, dataset: Any, classes: int) -> None:
        self.dataset = dataset
        self.classes = classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        x, y, *rest = self.dataset[index]
        return (x, self.classes - 1 - y, *rest)


class FlippedLabels:
    """A training loader whose batches carry the labels y as ``classes - 1 - y`` (the ``labelflip`` attacker's);
    its ``dataset`` is flipped too, for whatever samples from the dataset itself (DP-SGD's Poisson sampling)."""

    def __init__(self, loader: Any, classes: int) -> None:
        self.loader = loader
        self.classes = classes
        dataset = getattr(loader, "dataset", None)
        self.dataset = FlippedDataset(dataset, classes) if dataset is not None else None
        self.batch_size = getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[Any]]:
        for x, y, *rest in self.loader:
            yield [x, self.classes - 1 - y, *rest]
