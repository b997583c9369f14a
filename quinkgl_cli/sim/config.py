"""What a simulation was asked to do: the swarm's size, mode and schedule (`SimConfig`) and the manifest settings it
replaces (`Overrides`, applied by `apply_overrides`). Owns these types only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.sim.fieldconf import FieldConfig
from quinkgl_cli.transport.memory import DEFAULT_MAX_PEERS

Mode = Literal["gossip", "fedavg", "pairwise", "local"]
MODES: tuple[str, ...] = ("gossip", "fedavg", "pairwise", "local")


@dataclass(frozen=True)
class Overrides:
    """Manifest settings replaced for a simulation (flags of `quinkgl simulate`); strings are typed by the schema."""

    aggregation: str | None = None
    aggregation_params: Mapping[str, str] = field(default_factory=dict)
    topology: str | None = None
    topology_params: Mapping[str, str] = field(default_factory=dict)
    fanout: int | None = None
    training_params: Mapping[str, str] = field(default_factory=dict)
    compression_params: Mapping[str, str] = field(default_factory=dict)
    dp_epsilon: float | None = None
    byzantine_f: int | None = None
    personalization: str | None = None  # none | apfl | fedrep; its params replace the manifest's
    personalization_params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SimConfig:
    peers: int = 20
    rounds: int = 20
    partition: str = "iid"
    seed: int = 0
    mode: Mode = "gossip"
    attackers: int = 0
    attack: str = "signflip"
    clients_per_round: int = 10  # fedavg mode
    pairs_per_round: int = 10  # pairwise mode
    max_peers: int = DEFAULT_MAX_PEERS  # each node's peer-view bound (gossip and local modes)
    threads: int = 1  # torch intra-op threads: peers run one after another, so tiny models do best on one
    script_args: Mapping[str, str] = field(default_factory=dict)
    overrides: Overrides = field(default_factory=Overrides)
    conditions: FieldConfig | None = None  # field conditions: run by `quinkgl_cli.sim.field` in virtual time; None: lockstep



def apply_overrides(manifest: Manifest, ov: Overrides) -> Manifest:
    """A copy of ``manifest`` with ``ov`` applied, validated as a whole; bad values are usage errors.

    The copy is unsigned: it exists only inside this process and no peer ever checks it.
    """
    from quinkgl_cli.manifest.create import coerce_value
    from quinkgl_cli.strategies import registry

    data = manifest.model_dump(mode="python")
    data["signature"] = None
    for kind, name, params in (
        ("aggregation", ov.aggregation, ov.aggregation_params),
        ("topology", ov.topology, ov.topology_params),
    ):
        current = data[kind]
        entry = registry.resolve(kind, name or current["name"])  # type: ignore[arg-type]
        merged = dict(current["params"]) if entry.name == current["name"] else {}
        merged.update(params)
        if kind == "topology" and ov.fanout is not None:
            if "fanout" not in entry.params.model_fields:
                raise UsageError(f"--fanout does not apply to {entry.name}", "drop --fanout or pick another topology")
            merged["fanout"] = ov.fanout
        data[kind] = {"name": entry.name, "params": registry.validate_params(entry, merged)}
    for section, params in (("training", ov.training_params), ("compression", ov.compression_params)):
        if params:
            data[section] = {**data[section], **{k: coerce_value(v) for k, v in params.items()}}
    if ov.dp_epsilon is not None:
        data["privacy"] = {**data["privacy"], "dp_epsilon": ov.dp_epsilon}
    if ov.byzantine_f is not None:
        data["byzantine_f"] = ov.byzantine_f
    if ov.personalization is not None or ov.personalization_params:
        from quinkgl_cli.manifest.create import personalization_spec

        mode = ov.personalization or manifest.personalization.mode
        data["personalization"] = personalization_spec(mode, ov.personalization_params).model_dump(mode="python")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "manifest"
        raise UsageError(f"simulation setting {where}: {err['msg']}", "fix the override flag") from exc

