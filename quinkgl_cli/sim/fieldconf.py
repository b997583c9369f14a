"""The field conditions of a simulation (`FieldConfig`): latency, bandwidth, message loss, churn, late joiners and
training speeds, in virtual seconds, or a recorded trace to replay instead, and their parsing from `quinkgl
simulate`'s flags (`field_config`).

Owns these settings and their validation only; `quinkgl_cli.sim.field` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from quinkgl_cli.errors import UsageError
from quinkgl_cli.node.options import DEFAULT_GOSSIP_INTERVAL
from quinkgl_cli.sim.dist import Dist, parse_dist

DEFAULT_TRAIN_SECONDS = 1.0  # a round's local training, in virtual seconds, when --speed is not given
DEFAULT_CHURN_AWAY = 2.0  # rounds a leaving peer stays away


def _fixed(value: float) -> Dist:
    return Dist("fixed", (value,), str(value))


@dataclass(frozen=True)
class FieldConfig:
    """What the field driver simulates; the defaults are ideal conditions (no delay, no loss, nobody leaves)."""

    latency: Dist = field(default_factory=lambda: _fixed(0.0))  # seconds per message, drawn per message
    bandwidth: Dist | None = None  # bytes/s per peer, drawn once per peer; None: transfers take no time
    drop: float = 0.0  # probability that a message (a model or a control message) is lost
    churn: float = 0.0  # share of the online peers that leave at each round interval
    churn_away: float = DEFAULT_CHURN_AWAY  # rounds (intervals) a leaving peer stays away, on average
    churn_fresh: float = 0.0  # share of returning peers that lost their checkpoint (they start from round 0)
    late_join: float = 0.0  # share of the peers that first join mid-run (in the run's first half), from scratch
    speed: Dist = field(default_factory=lambda: _fixed(DEFAULT_TRAIN_SECONDS))  # seconds per round of training, per peer
    gossip_interval: float = DEFAULT_GOSSIP_INTERVAL  # virtual seconds between round starts (the daemon's flag)
    trace: Path | None = None  # a recorded trace replayed instead of speed, transfers and churn (`sim.replay`)


def _share(flag: str, value: float | None, allow_one: bool = True) -> float:
    if value is None:
        return 0.0
    top_ok = value <= 1 if allow_one else value < 1
    if not (math.isfinite(value) and value >= 0 and top_ok):
        span = "0 to 1" if allow_one else "0 up to (not including) 1"
        raise UsageError(f"{flag} {value}: must be a share from {span}", f"e.g. {flag} 0.1 for 10%")
    return value


def field_config(latency: str | None = None, bandwidth: str | None = None, drop: float | None = None,
                 churn: float | None = None, churn_away: float | None = None, churn_fresh: float | None = None,
                 late_join: float | None = None, speed: str | None = None,
                 gossip_interval: float | None = None, trace: Path | None = None) -> FieldConfig | None:
    """The field conditions the flags ask for, validated; None when no field flag was given (the lockstep driver)."""
    drawn = {"--latency": latency, "--bandwidth": bandwidth, "--drop": drop, "--churn": churn,
             "--churn-away": churn_away, "--churn-fresh": churn_fresh, "--late-join": late_join, "--speed": speed}
    if trace is not None:
        clash = [flag for flag, value in drawn.items() if value is not None]
        if clash:
            raise UsageError(f"--trace replays training times, transfers and arrivals: {clash[0]} cannot be added",
                             f"drop {clash[0]}, or drop --trace")
    if all(v is None for v in (*drawn.values(), gossip_interval, trace)):
        return None
    if gossip_interval is not None and not (math.isfinite(gossip_interval) and gossip_interval > 0):
        raise UsageError(f"--gossip-interval {gossip_interval}: must be above 0 (virtual seconds)",
                         "e.g. --gossip-interval 10")
    if churn_away is not None and not (math.isfinite(churn_away) and churn_away > 0):
        raise UsageError(f"--churn-away {churn_away}: must be above 0 (rounds)", "e.g. --churn-away 2")
    return FieldConfig(
        latency=parse_dist("--latency", latency, "seconds") if latency is not None else _fixed(0.0),
        bandwidth=parse_dist("--bandwidth", bandwidth, "bytes/s", positive=True) if bandwidth is not None else None,
        drop=_share("--drop", drop),
        churn=_share("--churn", churn, allow_one=False),
        churn_away=churn_away if churn_away is not None else DEFAULT_CHURN_AWAY,
        churn_fresh=_share("--churn-fresh", churn_fresh),
        late_join=_share("--late-join", late_join, allow_one=False),
        speed=parse_dist("--speed", speed, "seconds per round") if speed is not None else _fixed(DEFAULT_TRAIN_SECONDS),
        gossip_interval=gossip_interval if gossip_interval is not None else DEFAULT_GOSSIP_INTERVAL,
        trace=trace,
    )
