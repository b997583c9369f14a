"""The manifest's personalization section: whether and how each peer keeps a model of its own beside the shared one.

``none`` (the default) shares the whole model. ``apfl`` (Deng et al. 2020, "Adaptive Personalized Federated
Learning") keeps a local model beside the shared one and serves their mixture, its weight ``alpha`` learned per
peer from ``alpha`` with step ``alpha_lr``. ``fedrep`` (Collins et al. 2021) splits the model into a shared backbone
and a personal head (``head_prefixes``: parameter-name prefixes; empty means the script's ``quinkgl_head``
attribute on the model, else the last layer), trains the head for ``head_epochs`` then the backbone, and shares
only the backbone; after the final merge the head trains again, on the merged backbone. Signed like the rest of
the manifest, so the peers of one swarm agree on it.

Pure data: no torch, so `manifest create` validates it fast. A setting of the mode that is not chosen is refused,
like compression knobs while compression is off: it would do nothing and mislead whoever reads the manifest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["none", "apfl", "fedrep"]
MODES: tuple[Mode, ...] = ("none", "apfl", "fedrep")
APFL_TUNING = ("alpha", "alpha_lr")
FEDREP_TUNING = ("head_prefixes", "head_epochs")


class PersonalizationSpec(BaseModel):
    # As schema.Strict (which imports this module): unknown fields refused, no Infinity or NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Mode = "none"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # APFL: the mixing weight a peer starts from
    alpha_lr: float = Field(default=0.01, ge=0.0, le=10.0)  # APFL: step of alpha's gradient descent (0: fixed)
    head_prefixes: tuple[str, ...] = Field(default=(), max_length=64)  # FedRep: the personal head's names
    # FedRep: passes over the data training the head each round. The paper's many cheap head updates per update of
    # the representation (its experiments: 10 head epochs, 1 for the representation; here the backbone takes the
    # swarm's local_epochs). 10 against 2 on 20-peer digits (benchmarks/bench_personal.py, seeds 7, 1, 2), own
    # accuracy: MLP +0.7 points (dirichlet:0.3) and +0.3 (shards:2), CNN +2.2 and +0.1.
    head_epochs: int = Field(default=10, ge=1, le=1000)

    @field_validator("head_prefixes")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not prefix or len(prefix) > 256 or prefix.strip() != prefix:
                raise ValueError(f"head prefix {prefix!r} must be a parameter-name prefix such as fc3 or head.")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> PersonalizationSpec:
        idle = self.idle_tuning()
        if idle:
            raise ValueError(idle_message(idle, self.mode))
        return self

    def idle_tuning(self, given: tuple[str, ...] = ()) -> list[str]:
        """Settings of a mode that is not chosen, differing from the default or named in ``given``."""
        idle = []
        for mode, keys in (("apfl", APFL_TUNING), ("fedrep", FEDREP_TUNING)):
            if self.mode != mode:
                idle += [k for k in keys if k in given or getattr(self, k) != type(self).model_fields[k].default]
        return idle

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def idle_message(idle: list[str], mode: str) -> str:
    return (f"{', '.join(idle)} {'does' if len(idle) == 1 else 'do'} nothing with personalization {mode}"
            " (alpha, alpha_lr are apfl's; head_prefixes, head_epochs fedrep's)")
