"""Typed parameter schemas of every strategy. Pure pydantic: the manifest layer validates params without torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Bounds of the counts below: far beyond any real swarm, and inside the integers a manifest can hold (< 2**53).
MAX_PEERS = 100_000
MAX_ROUNDS = 1_000_000


class Params(BaseModel):
    # defer_build: a schema is built when a strategy's params are first validated, not for all of them at import
    # (start-up of `manifest verify`). allow_inf_nan=False: a manifest is JSON, which has no Infinity or NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, allow_inf_nan=False)


class NoParams(Params):
    pass


class FedAvgParams(Params):
    # A peer's self-reported sample count may give it at most this multiple of the mean weight.
    max_weight_ratio: float = Field(default=2.0, ge=1.0)
    self_weight: float | None = Field(default=None, gt=0.0, lt=1.0)


class FedProxParams(FedAvgParams):
    mu: float = Field(default=0.01, ge=0.0)


class FedAvgMParams(FedAvgParams):
    server_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    server_lr: float = Field(default=1.0, gt=0.0)


class KrumParams(Params):
    f: int | None = Field(default=None, ge=0, le=MAX_PEERS)  # defaults to the manifest's byzantine_f


class MultiKrumParams(KrumParams):
    m: int | None = Field(default=None, ge=1, le=MAX_PEERS)  # how many best-scored updates to average (default n - f)


class TrimmedMeanParams(Params):
    f: int | None = Field(default=None, ge=0, le=MAX_PEERS)
    trim_ratio: float | None = Field(default=None, ge=0.0, lt=0.5)


class EntropyWeightedAvgParams(FedAvgParams):
    entropy_floor: float = Field(default=0.1, ge=0.0)
    fallback_weight: float = Field(default=1.0, gt=0.0)


class StalenessWeightedParams(FedAvgParams):
    decay: float = Field(default=0.5, gt=0.0)  # weight *= exp(-decay * age_in_rounds)


class ScaffoldParams(FedAvgParams):
    variate_momentum: float = Field(default=0.5, ge=0.0, lt=1.0)


class TopologyParams(Params):
    fanout: int = Field(default=3, ge=1, le=1000)


class CyclonParams(TopologyParams):
    view_size: int = Field(default=8, ge=1, le=1000)
    shuffle_length: int = Field(default=4, ge=1, le=1000)


class AffinityParams(TopologyParams):
    # Signal weights (the description's 40/30/15/15), normalized over the signals available for a peer:
    # gradient similarity only counts when both sides send gradient moments.
    label_weight: float = Field(default=0.4, ge=0.0)
    moment_weight: float = Field(default=0.3, ge=0.0)
    gradient_weight: float = Field(default=0.15, ge=0.0)
    history_weight: float = Field(default=0.15, ge=0.0)
    blind_rounds: int = Field(default=2, ge=0, le=MAX_ROUNDS)
    learning_rounds: int = Field(default=5, ge=0, le=MAX_ROUNDS)
    exploration: float = Field(default=0.3, ge=0.0, le=1.0)
    exploration_decay: float = Field(default=0.9, gt=0.0, le=1.0)
    min_exploration: float = Field(default=0.05, ge=0.0, le=1.0)
    ema: float = Field(default=0.3, gt=0.0, le=1.0)
    edge_decay: float = Field(default=0.95, gt=0.0, le=1.0)  # edge weight factor per round without an outcome
    edge_ttl: int = Field(default=20, ge=1, le=MAX_ROUNDS)  # rounds without an outcome before an edge is evicted
    prefer_similar: bool = True
