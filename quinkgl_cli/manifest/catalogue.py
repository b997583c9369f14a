"""The strategy catalogue: every name a manifest may carry, its parameter schema, and where its code lives.

The catalogue is manifest vocabulary, so it sits in the manifest layer; implementations are named by
"module:attribute" strings and imported only by `strategies.registry` when a node builds one. Importing this
module stays cheap (no torch): `manifest create` and `manifest verify` validate names and params with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest import strategy_params as p

Kind = Literal["aggregation", "topology"]


@dataclass(frozen=True)
class StrategyEntry:
    kind: Kind
    name: str  # canonical spelling, stored in manifests
    params: type[p.Params]
    impl: str  # "module:attribute", imported only when a node builds the strategy
    summary: str


_AGG = "quinkgl_cli.strategies.aggregation"
_TOPO = "quinkgl_cli.strategies.topology"

_ENTRIES: tuple[StrategyEntry, ...] = (
    StrategyEntry("aggregation", "FedAvg", p.FedAvgParams, f"{_AGG}:FedAvg", "sample-weighted average, bounded weights"),
    StrategyEntry("aggregation", "FedProx", p.FedProxParams, f"{_AGG}:FedProx", "FedAvg plus proximal term mu in the local loss"),
    StrategyEntry("aggregation", "FedAvgM", p.FedAvgMParams, f"{_AGG}:FedAvgM", "FedAvg with momentum on the aggregated delta"),
    StrategyEntry("aggregation", "Krum", p.KrumParams, f"{_AGG}:Krum", "Blanchard et al.: update closest to its n-f-2 neighbours"),
    StrategyEntry("aggregation", "MultiKrum", p.MultiKrumParams, f"{_AGG}:MultiKrum", "average of the m best Krum scores"),
    StrategyEntry("aggregation", "TrimmedMean", p.TrimmedMeanParams, f"{_AGG}:TrimmedMean", "coordinate-wise mean without f extremes per side"),
    StrategyEntry("aggregation", "Median", p.NoParams, f"{_AGG}:Median", "coordinate-wise median"),
    StrategyEntry("aggregation", "EntropyWeightedAvg", p.EntropyWeightedAvgParams, f"{_AGG}:EntropyWeightedAvg", "weights by label-distribution entropy"),
    StrategyEntry("aggregation", "StalenessWeightedFedAvg", p.StalenessWeightedParams, f"{_AGG}:StalenessWeightedFedAvg", "exponential penalty on old updates"),
    StrategyEntry("aggregation", "Scaffold", p.ScaffoldParams, f"{_AGG}:Scaffold", "gossip SCAFFOLD with control variates"),
    StrategyEntry("topology", "RandomTopology", p.TopologyParams, f"{_TOPO}:RandomTopology", "uniform fanout of known peers"),
    StrategyEntry("topology", "RotationTopology", p.TopologyParams, f"{_TOPO}:RotationTopology", "every known peer in turn, fanout a round, on a shared schedule"),
    StrategyEntry("topology", "CyclonTopology", p.CyclonParams, f"{_TOPO}:CyclonTopology", "partial view with age-based shuffles"),
    StrategyEntry("topology", "AffinityTopology", p.AffinityParams, f"{_TOPO}:AffinityTopology", "fingerprint similarity with exploration"),
    StrategyEntry("topology", "RingTopology", p.TopologyParams, f"{_TOPO}:RingTopology", "fixed ring by node id (experiments)"),
    StrategyEntry("topology", "ExpanderTopology", p.TopologyParams, f"{_TOPO}:ExpanderTopology", "fixed random graph: union of hashed rings"),
    StrategyEntry("topology", "FullTopology", p.TopologyParams, f"{_TOPO}:FullTopology", "every known peer (experiments)"),
)

_BY_KEY: dict[tuple[Kind, str], StrategyEntry] = {(e.kind, e.name.lower()): e for e in _ENTRIES}


def names(kind: Kind) -> list[str]:
    return [e.name for e in _ENTRIES if e.kind == kind]


def resolve(kind: Kind, name: str) -> StrategyEntry:
    """Find a strategy by name, case-insensitively; unknown names fail with the list of valid ones."""
    entry = _BY_KEY.get((kind, name.strip().lower()))
    if entry is None:
        raise UsageError(f"unknown {kind} strategy {name!r}", f"valid: {', '.join(names(kind))}")
    return entry


def validate_params(entry: StrategyEntry, raw: dict[str, Any]) -> dict[str, Any]:
    """Type ``raw`` (strings from `k=v` flags or values from a manifest) by the strategy's schema.

    Returns only the explicitly given keys, typed, so manifests stay minimal and defaults can improve.
    """
    try:
        model = entry.params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "params"
        valid = ", ".join(entry.params.model_fields) or "none"
        raise UsageError(f"{entry.name} parameter {where}: {err['msg']}", f"valid parameters: {valid}") from exc
    return model.model_dump(include=set(raw))
