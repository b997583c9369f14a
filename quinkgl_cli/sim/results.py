"""What a simulation reports: per-peer and per-round summaries (`RoundSummary`, summarized from the nodes' round
metrics by `summarize`) and the whole run's `SimResult`, with the process's memory figures (`rss_mb`).
Owns these types and the summarizing only.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.sim.config import SimConfig


@dataclass
class PeerRound:
    peer: str
    val_accuracy: float | None
    val_loss: float | None
    loss: float | None
    samples: int
    bytes_sent: int
    bytes_received: int
    updates_sent: int
    attacker: bool = False
    own_accuracy: float | None = None  # the personal model on the peer's own label distribution
    personal_val_accuracy: float | None = None  # APFL: the personal model on the validation set
    alpha: float | None = None  # APFL's mixing weight


@dataclass
class RoundSummary:
    round: int
    phase: str  # "train" | "consensus"
    mean_accuracy: float | None
    min_accuracy: float | None
    max_accuracy: float | None
    mean_val_loss: float | None
    bytes_sent: int
    model_sends: int
    seconds: float
    peers: list[PeerRound]
    mean_own_accuracy: float | None = None  # personal models on their peers' own label distributions
    min_own_accuracy: float | None = None
    mean_personal_val_accuracy: float | None = None  # APFL: personal models on the validation set


@dataclass
class SimResult:
    config: SimConfig
    manifest: Manifest
    swarm_id: str
    node_ids: list[str]
    attackers: list[str]
    rounds: list[RoundSummary]
    consensus: RoundSummary | None
    consensus_steps: int
    gossip_steps: int
    memory: dict[str, float]
    timing: dict[str, float]
    conditions: dict[str, Any] = field(default_factory=dict)  # field conditions and what they did (`sim.field`)

    @property
    def final(self) -> RoundSummary:
        return self.consensus if self.consensus is not None else self.rounds[-1]


def summarize(round_idx: int, phase: str, started: float, reporting: Iterable[Any], every: Iterable[Any],
              attackers: set[str], metrics: Mapping[str, Mapping[str, Any]]) -> RoundSummary:
    """One round's summary from each node's metrics (`RoundMetrics.as_dict`): ``reporting`` nodes are listed
    (accuracies count only honest ones), traffic counts ``every`` node."""
    peers: list[PeerRound] = []
    for node in reporting:
        m = metrics.get(node.node_id, {})
        peers.append(PeerRound(
            peer=node.node_id,
            val_accuracy=m.get("val_accuracy"),
            val_loss=m.get("val_loss"),
            loss=m.get("loss"),
            samples=int(m.get("samples") or node.sample_count),
            bytes_sent=int(m.get("bytes_sent", 0)),
            bytes_received=int(m.get("bytes_received", 0)),
            updates_sent=int(m.get("updates_sent", 0)),
            attacker=node.node_id in attackers,
            own_accuracy=m.get("own_accuracy"),
            personal_val_accuracy=m.get("personal_val_accuracy"),
            alpha=m.get("alpha"),
        ))
    honest = [p for p in peers if not p.attacker]
    accs = [p.val_accuracy for p in honest if p.val_accuracy is not None]
    losses = [p.val_loss for p in honest if p.val_loss is not None]
    own = [p.own_accuracy for p in honest if p.own_accuracy is not None]
    personal = [p.personal_val_accuracy for p in honest if p.personal_val_accuracy is not None]
    every = list(every)
    sent = sum(int(metrics.get(n.node_id, {}).get("bytes_sent", 0)) for n in every)
    sends = sum(int(metrics.get(n.node_id, {}).get("updates_sent", 0)) for n in every)
    return RoundSummary(
        round=round_idx, phase=phase,
        mean_accuracy=_mean(accs), min_accuracy=min(accs) if accs else None, max_accuracy=max(accs) if accs else None,
        mean_val_loss=_mean(losses), bytes_sent=sent, model_sends=sends,
        seconds=time.perf_counter() - started, peers=peers,
        mean_own_accuracy=_mean(own), min_own_accuracy=min(own) if own else None,
        mean_personal_val_accuracy=_mean(personal),
    )


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None

