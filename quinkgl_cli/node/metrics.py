"""A node's round metrics and history.

Owns what a round records while it runs (when it began, the training and evaluation results, the peers aggregated
and the samples they carried), the history of completed rounds' metrics, and the run's totals across restarts
(peers met, bytes and updates moved in earlier processes). Checkpointed: the history and the totals (`state_dict`),
so a resumed daemon's ``finished`` line reports the whole run.

Traffic is counted end to end: a round's bytes and updates are those the transport moved since the previous
round (or the final consensus) ended, or since the process started, so nothing that moved between rounds (a send
still in flight when the round closed, a peer's update that arrived while this one waited for its next round) is
left out, and the rounds' counts, with the final consensus's (`Node.end_consensus`), add up to `recorded`: the
``finished`` line's totals, and those a checkpoint keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from quinkgl_cli.node.trainer import EvalStats, TrainStats
from quinkgl_cli.transport.base import TransportStats

MET_NAMES = 4096  # names of the peers met that a node keeps (and checkpoints); past them it only counts peers
PERSONAL_FIELDS = ("own_accuracy", "personal_val_accuracy", "alpha")  # what `RoundMetrics.personal_fields` may hold


@dataclass
class AggregationOutcome:
    peers: list[str]  # remote peers whose updates shaped the result
    rejected: list[str]
    samples: int  # local + used remote sample counts (as reported, before bounding)
    note: str = ""


@dataclass
class RoundMetrics:
    round: int
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    peer_ids: list[str] = field(default_factory=list)  # distinct remote peers aggregated this round
    samples: int = 0  # local training samples
    aggregated_samples: int = 0
    known_peers: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    updates_sent: int = 0
    updates_received: int = 0
    updates_dropped: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0
    duration: float = 0.0
    sharing: dict[str, Any] = field(default_factory=dict)  # compression and privacy counters (SharingPipeline)
    spectral: dict[str, Any] = field(default_factory=dict)  # the latest analysis of the observed gossip graph
    # The personal model (`node.personal`): ``own_accuracy`` on this peer's own label distribution (`node.owneval`);
    # under APFL also ``personal_val_accuracy`` (on the validation set) and ``alpha`` (its mixing weight).
    personal: dict[str, Any] = field(default_factory=dict)

    @property
    def peers(self) -> int:
        return len(self.peer_ids)

    def personal_fields(self) -> dict[str, Any]:
        """What ``round-end``, ``final-consensus`` and ``finished`` report of the personal model."""
        return dict(self.personal)

    def as_dict(self) -> dict[str, Any]:
        # Built by hand: `dataclasses.asdict` deep-copies every value, a tenth of a simulated peer's round at
        # 1,000 peers; the nested dicts hold scalars only, so shallow copies keep the caller's dict its own.
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["peer_ids"] = list(self.peer_ids)
        d["peers"] = self.peers
        d.update(d.pop("personal"))
        d.update(d.pop("sharing"))
        d.update({f"spectral_{k}": v for k, v in d.pop("spectral").items()})
        return d


@dataclass(frozen=True)
class Counters:
    """The transport's traffic counters at one moment."""

    bytes_sent: int = 0
    bytes_received: int = 0
    models_sent: int = 0
    models_received: int = 0

    @staticmethod
    def of(stats: TransportStats) -> Counters:
        return Counters(stats.bytes_sent, stats.bytes_received, stats.models_sent, stats.models_received)

    def minus(self, other: Counters) -> Counters:
        return Counters(self.bytes_sent - other.bytes_sent, self.bytes_received - other.bytes_received,
                        self.models_sent - other.models_sent, self.models_received - other.models_received)

    def plus(self, other: Counters) -> Counters:
        return Counters(self.bytes_sent + other.bytes_sent, self.bytes_received + other.bytes_received,
                        self.models_sent + other.models_sent, self.models_received + other.models_received)


def _personal(ev: EvalStats | None) -> dict[str, Any]:
    if ev is None:
        return {}
    fields: dict[str, Any] = {"own_accuracy": ev.own_accuracy}
    if ev.personal_val_accuracy is not None:
        fields.update(personal_val_accuracy=ev.personal_val_accuracy, alpha=ev.alpha)
    return fields


class RoundRecorder:
    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.started = 0.0
        self.at_last_end = Counters()  # the transport's counters when the last round (or consensus) of this process ended
        self.train: TrainStats | None = None
        self.eval: EvalStats | None = None
        self.peers: list[str] = []
        self.aggregated_samples = 0
        self.met: set[str] = set()  # peers this process has met, up to MET_NAMES of them
        # Earlier processes of this run (restored from the checkpoint): peers they met, traffic they moved.
        self.earlier_peers: set[str] = set()
        self.unnamed_peers = 0  # peers met (in this run, earlier processes too) whose names were not kept
        self.earlier_traffic = Counters()
        self.consensus: dict[str, Any] | None = None  # the final consensus's metrics, once it ran

    def begin(self, now: float) -> None:
        self.started = now
        self.train = None
        self.eval = None
        self.peers = []
        self.aggregated_samples = 0

    def aggregated(self, used: Iterable[str], samples: int) -> None:
        for p in used:
            if p not in self.peers:
                self.peers.append(p)
        self.aggregated_samples = samples

    def finish(self, round_: int, now: float, stats: TransportStats, known_peers: int, dropped: int,
               sample_count: int, sharing: dict[str, Any], spectral: dict[str, Any],
               consensus: bool = False) -> RoundMetrics:
        """The metrics of the round that ends now (the caller appends them to the history once it is complete);
        its traffic is what moved since the last one ended. The final consensus's (``consensus``) are kept as
        ``consensus`` instead: they are no round's."""
        now_counters = Counters.of(stats)
        moved = now_counters.minus(self.at_last_end)
        self.at_last_end = now_counters
        train, ev = self.train, self.eval
        metrics = RoundMetrics(
            round=round_,
            loss=train.loss if train else None,
            accuracy=train.accuracy if train else None,
            val_loss=ev.val_loss if ev else None,
            val_accuracy=ev.val_accuracy if ev else None,
            peer_ids=list(self.peers),
            samples=train.samples if train else sample_count,
            aggregated_samples=self.aggregated_samples,
            known_peers=known_peers,
            bytes_sent=moved.bytes_sent,
            bytes_received=moved.bytes_received,
            updates_sent=moved.models_sent,
            updates_received=moved.models_received,
            updates_dropped=dropped,
            train_time=train.duration if train else 0.0,
            eval_time=ev.duration if ev else 0.0,
            duration=now - self.started,
            sharing=sharing,
            spectral=spectral,
            personal=_personal(ev),
        )
        if consensus:
            self.consensus = metrics.as_dict()
        return metrics

    def meet(self, peer: str) -> bool:
        """Note that this process met ``peer``; False when it had already (as far as the names kept tell). Past
        MET_NAMES names a peer is only counted: keys cost nothing, and one name per key met, kept for good in
        memory and in every checkpoint, grew without bound under keys that come and go."""
        if peer in self.met:
            return False
        if len(self.met) < MET_NAMES:
            self.met.add(peer)
        else:
            self.unnamed_peers += 1
        return True

    def recent_durations(self, rounds: int) -> list[float]:
        """Durations in seconds of the last ``rounds`` completed rounds (those recorded)."""
        return [h["duration"] for h in self.history[-rounds:] if isinstance(h.get("duration"), float)]

    def last(self) -> dict[str, Any]:
        return dict(self.history[-1]) if self.history else {}

    def totals(self, stats: TransportStats) -> dict[str, int]:
        """The whole run's peers met and traffic so far, this process's added to earlier processes' (status)."""
        return self._totals(self.earlier_traffic.plus(Counters.of(stats)))

    def recorded(self) -> dict[str, int]:
        """The whole run's peers met and the traffic its rounds and final consensuses recorded: the sum of their
        metrics (what the ``finished`` line says and a checkpoint keeps; later traffic belongs to the next round)."""
        return self._totals(self.earlier_traffic.plus(self.at_last_end))

    def _totals(self, traffic: Counters) -> dict[str, int]:
        return {"peers_met": len(self.earlier_peers | self.met) + self.unnamed_peers, "bytes_sent": traffic.bytes_sent,
                "bytes_received": traffic.bytes_received, "updates_sent": traffic.models_sent,
                "updates_received": traffic.models_received}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        totals = self.recorded()
        names = sorted(self.earlier_peers | self.met)
        return {"history": self.history, "known_peers": names[:MET_NAMES],
                "unnamed_peers": self.unnamed_peers + max(len(names) - MET_NAMES, 0),
                "totals": {k: v for k, v in totals.items() if k != "peers_met"}}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.history = list(meta.get("history", []))
        known = [str(p) for p in meta.get("known_peers", [])]
        self.earlier_peers = set(known[:MET_NAMES])
        self.unnamed_peers = int(meta.get("unnamed_peers", 0)) + max(len(known) - MET_NAMES, 0)
        t = meta.get("totals") or {}
        self.earlier_traffic = Counters(int(t.get("bytes_sent", 0)), int(t.get("bytes_received", 0)),
                                        int(t.get("updates_sent", 0)), int(t.get("updates_received", 0)))
