"""The swarm manifest (`.qgl`): a strict pydantic model, the contract every peer of a swarm shares.

Everything here is pure data: no torch, no ipv8, so `manifest create/verify/show` start fast.
Field meanings are documented in README ("Manifest format").
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest.personalization import PersonalizationSpec
from quinkgl_cli.validation import peer_address

SCHEMA_VERSION: Literal[1] = 1
HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
PUBKEY_PATTERN = r"^ed25519:[0-9a-f]{64}$"
# RFC 8785 writes numbers as IEEE doubles: larger integers have no canonical form (and would not survive a
# JavaScript or Go reader either), so no integer a manifest holds may exceed this.
MAX_JSON_INT = 2**53 - 1
MAX_DIM = 2**31 - 1  # one dimension of a per-sample tensor shape
MAX_ROUNDS = 10**9

TaskType = Literal["classification", "regression", "segmentation", "detection"]
LabelType = Literal["integer", "float", "one_hot"]
Framework = Literal["pytorch", "tensorflow", "custom"]
Membership = Literal["open", "certified"]  # certified: only nodes holding the creator's certificate are peers
JsonInt = Annotated[int, Field(ge=-MAX_JSON_INT, le=MAX_JSON_INT)]
ParamValue = bool | JsonInt | float | str
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]


class Strict(BaseModel):
    # allow_inf_nan=False: JSON has no Infinity or NaN, so such a value could be neither signed nor written.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskSpec(Strict):
    type: TaskType
    input_shape: tuple[Dim, ...] = Field(min_length=1, max_length=8)
    output_shape: tuple[Dim, ...] = Field(min_length=1, max_length=8)
    label_type: LabelType


class ModelSpec(Strict):
    framework: Framework
    arch_hash: str = Field(pattern=HASH_PATTERN)


class StrategySpec(Strict):
    """An aggregation or topology strategy: canonical registry name plus typed parameters."""

    name: str = Field(min_length=1, max_length=64)
    params: dict[str, ParamValue] = Field(default_factory=dict)


class TrainingSpec(Strict):
    """How much local work a round does and how rounds mix. Daemon flags may override some of these.

    Defaults measured with `benchmarks/bench_sim.py --skip-scale` (20 peers, 2 label shards each, digits MLP, 20
    rounds, fanout 3, seeds 7/1/2, with the node's default slow momentum): 4 local epochs reach 90.2% mean / 84.7%
    worst peer after the last round, and the 6 averaging-only exchanges after it ("A Single Merging Suffices",
    2025) 91.8% / 90.8%; 1 epoch without the merge reaches 78.0% / 61.6%. More local work between exchanges is the
    lever here; the merge pulls the last drift together.
    """

    local_epochs: int = Field(default=4, ge=1, le=1000)
    # When set, passes are added until a round takes at least this many optimizer steps (`node.localwork`; off by
    # default: it lifts some families and costs others). A manifest leaves it out at 0 (`canonical.manifest_object`).
    min_local_steps: int = Field(default=0, ge=0, le=100_000)
    local_steps: int | None = Field(default=None, ge=1, le=MAX_ROUNDS)  # when set, caps optimizer steps per round
    gossip_steps: int = Field(default=1, ge=1, le=20)  # exchanges (send + aggregate) per training round
    final_consensus_steps: int = Field(default=6, ge=0, le=100)  # averaging-only exchanges after the last round
    max_staleness: int = Field(default=2, ge=0, le=1000)  # updates older than this many rounds are dropped


# Settings that only tune a stage that is on: set while it is off, they do nothing, and a manifest that
# carries them misleads whoever reads it, so they are refused. `manifest create` refuses them as soon as they
# are given, even with their default value; a file is judged by its values (for DP, see PrivacySpec).
COMPRESSION_TUNING = ("delta", "error_feedback", "ef21_momentum", "residual_norm_cap", "block_size", "mode",
                      "consensus_step")
# CHOCO gossip (`strategies.choco`) replaces the averaging of whole models by a consensus step on public estimates:
# rules that need whole models (robust ones), keep their own state of the average (FedAvgM's momentum, Scaffold's
# variates) or whose recipients change every round would break its estimates or its step.
CHOCO_AGGREGATIONS = ("FedAvg", "FedProx", "EntropyWeightedAvg", "StalenessWeightedFedAvg")
CHOCO_TOPOLOGIES = ("ExpanderTopology", "RingTopology", "FullTopology")
DP_TUNING = ("dp_delta", "dp_clip_norm", "dp_total_epsilon")


class CompressionSpec(Strict):
    """delta -> sparsify -> quantize -> serialize -> lossless, with error feedback. Off by default.

    Off means no top_k_ratio, quantize_bits or qsgd_levels and lossless "none": updates go out uncompressed.
    ``mode``: "reconstruct" (each receiver rebuilds the sender's model from deltas and averages it) or "choco"
    (CHOCO gossip on public estimates, `strategies.choco`, with step ``consensus_step``; default 1 without
    top-k, min(0.5, 2 * sqrt(top_k_ratio)) with it: `strategies.choco.default_step`).
    """

    delta: bool = True
    top_k_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    quantize_bits: Literal[8, 16] | None = None
    qsgd_levels: int | None = Field(default=None, ge=1, le=65535)
    lossless: Literal["none", "zlib", "zstd"] = "none"
    error_feedback: bool = True
    ef21_momentum: float | None = Field(default=None, gt=0.0, le=1.0)
    residual_norm_cap: float | None = Field(default=None, gt=0.0)
    block_size: int = Field(default=256, ge=8, le=1 << 20)  # values per quantization scale / QSGD bucket
    mode: Literal["reconstruct", "choco"] = "reconstruct"
    consensus_step: float | None = Field(default=None, gt=0.0, le=1.0)  # CHOCO's gamma

    @model_validator(mode="after")
    def _coherent(self) -> CompressionSpec:
        if self.top_k_ratio is not None and not self.delta:
            raise ValueError("top_k_ratio needs delta=true (sparsified full weights would zero the rest of the model)")
        if self.quantize_bits is not None and self.qsgd_levels is not None:
            raise ValueError("choose one of quantize_bits and qsgd_levels")
        idle = self.idle_tuning()
        if idle:
            raise ValueError(idle_compression_message(idle))
        if self.mode == "choco":
            self._choco_coherent()
        elif self.consensus_step is not None:
            raise ValueError("consensus_step is CHOCO's step size: it needs mode=choco")
        return self

    def _choco_coherent(self) -> None:
        if self.top_k_ratio is None and self.quantize_bits is None and self.qsgd_levels is None:
            raise ValueError("mode=choco needs a lossy compressor (top_k_ratio, quantize_bits or qsgd_levels):"
                             " without one it is plain gossip with a smaller step")
        # The estimate is CHOCO's own error feedback: these settings of the reconstruct mode would change nothing.
        unused = [k for k in ("ef21_momentum", "residual_norm_cap") if getattr(self, k) is not None]
        unused += [k for k in ("delta", "error_feedback") if not getattr(self, k)]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to mode=choco"
                             " (its public estimate carries what compression dropped); drop them")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when used: manifests made before CHOCO keep their canonical bytes, signatures and swarm ids.
        data: dict[str, Any] = handler(self)
        if self.mode == "reconstruct":
            data.pop("mode", None)
        if self.consensus_step is None:
            data.pop("consensus_step", None)
        return data

    @property
    def enabled(self) -> bool:
        return self.top_k_ratio is not None or self.quantize_bits is not None or self.qsgd_levels is not None or self.lossless != "none"

    def idle_tuning(self, given: Iterable[str] = ()) -> list[str]:
        """Tuning settings in effect for nothing: compression is off and they differ from the default or are in ``given``."""
        if self.enabled:
            return []
        return [k for k in COMPRESSION_TUNING if k in given or getattr(self, k) != type(self).model_fields[k].default]


def idle_compression_message(idle: list[str]) -> str:
    return (
        f"{', '.join(idle)} {'does' if len(idle) == 1 else 'do'} nothing while compression is off"
        " (set top_k_ratio, quantize_bits, qsgd_levels or lossless to turn it on)"
    )


PrivacyMode = Literal["local_update", "dp_sgd"]
DEFAULT_MAX_NOISE_MULTIPLIER = 30.0


class DpSgdSpec(Strict):
    """Sample-level DP of local training (DP-SGD): a total (epsilon, delta) per peer for the whole run.

    Every local step samples each training example independently with probability q (Poisson sampling; q = the
    training loader's batch size / the peer's training-set size), clips each example's gradient to ``clip_norm``
    and adds Gaussian noise of standard deviation sigma * ``clip_norm``; a Renyi accountant composes every step
    of the run. Sigma is derived from the budget before the run starts; a run that needs more noise than
    ``max_noise_multiplier`` (the noise would drown every gradient) is refused.
    """

    epsilon: float = Field(gt=0.0)  # total, per peer, for the whole run
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    clip_norm: float = Field(default=1.0, gt=0.0)  # L2 bound of one example's gradient
    sampling: Literal["poisson"] = "poisson"  # what the accountant assumes and the trainer does
    max_noise_multiplier: float = Field(default=DEFAULT_MAX_NOISE_MULTIPLIER, gt=0.0)


class PrivacySpec(Strict):
    """Differential privacy and fingerprint privacy. ``mode`` ``local_update``: DP of the shared update per round,
    off while ``dp_epsilon`` is unset; ``dp_sgd``: DP-SGD under the ``dp_sgd`` section's whole-run budget."""

    mode: PrivacyMode = "local_update"
    dp_sgd: DpSgdSpec | None = None
    dp_epsilon: float | None = Field(default=None, gt=0.0)
    dp_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    dp_clip_norm: float = Field(default=1.0, gt=0.0)
    dp_total_epsilon: float | None = Field(default=None, gt=0.0)  # stop sharing once spent
    fingerprint: bool = True
    fingerprint_noise: float = Field(default=0.1, ge=0.0)
    gradient_moments: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> PrivacySpec:
        # By value only the budget: dp_delta and dp_clip_norm are kept by manifests derived with DP turned off
        # (the simulator's FedAvg server), where their values are harmless. `manifest create` refuses all three.
        if self.mode == "dp_sgd":
            if self.dp_sgd is None:
                raise ValueError("privacy mode dp_sgd needs its dp_sgd section (epsilon, delta, clip_norm)")
            local = [k for k in ("dp_epsilon", "dp_total_epsilon") if getattr(self, k) is not None]
            if local:
                raise ValueError(f"{', '.join(local)} belong to privacy mode local_update; under dp_sgd the budget is"
                                 " dp_sgd.epsilon")
            if self.fingerprint or self.gradient_moments:
                raise ValueError("privacy mode dp_sgd keeps data-derived fingerprints home: set fingerprint and"
                                 " gradient_moments to false (their statistics are not covered by the DP-SGD budget)")
            return self
        if self.dp_sgd is not None:
            raise ValueError("a dp_sgd section needs privacy mode dp_sgd")
        if self.dp_epsilon is None and self.dp_total_epsilon is not None:
            raise ValueError(idle_dp_message(["dp_total_epsilon"]))
        return self

    @property
    def any_dp(self) -> bool:
        """True when some differential privacy is on (either mode)."""
        return self.dp_epsilon is not None or self.dp_sgd is not None


def idle_dp_message(idle: list[str], epsilon: str = "dp_epsilon") -> str:
    one = len(idle) == 1
    return (
        f"{', '.join(idle)} {'needs' if one else 'need'} {epsilon}: without it local DP is off and"
        f" {'it does' if one else 'they do'} nothing"
    )


class Manifest(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(default="", max_length=4096)
    created_at: datetime
    expires_at: datetime | None = None
    task: TaskSpec
    data_schema_hash: str = Field(pattern=HASH_PATTERN)
    model: ModelSpec
    aggregation: StrategySpec
    topology: StrategySpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    personalization: PersonalizationSpec = Field(default_factory=PersonalizationSpec)
    round_limit: int | None = Field(default=None, ge=1, le=MAX_ROUNDS)
    byzantine_f: int = Field(default=0, ge=0, le=1000)
    bootstrap_peers: tuple[str, ...] = Field(default=(), max_length=64)
    membership: Membership = "open"
    creator_pubkey: str | None = Field(default=None, pattern=PUBKEY_PATTERN)
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @model_validator(mode="after")
    def _private(self) -> Manifest:
        if self.aggregation.name.lower() == "scaffold" and self.privacy.any_dp:
            raise ValueError(
                "aggregation Scaffold cannot be combined with local DP (dp_epsilon) or dp_sgd: its control variate is the raw"
                " mean gradient, shared without the DP noise; choose another aggregation or drop DP"
            )
        return self

    @model_validator(mode="after")
    def _choco_fits(self) -> Manifest:
        if self.compression.mode == "choco":
            if self.aggregation.name not in CHOCO_AGGREGATIONS:
                raise ValueError(
                    f"compression mode choco cannot run with aggregation {self.aggregation.name}: its consensus step"
                    f" averages estimate differences, so it needs an averaging rule ({', '.join(CHOCO_AGGREGATIONS)})")
            if self.topology.name not in CHOCO_TOPOLOGIES:
                raise ValueError(
                    f"compression mode choco cannot run with topology {self.topology.name}: the peers that hold a"
                    " node's estimate must receive every increment, so recipients must stay the same from round to"
                    f" round ({', '.join(CHOCO_TOPOLOGIES)})")
        return self

    @field_validator("created_at", "expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamps must carry a timezone (e.g. 2026-12-31T00:00:00Z)")
        return value

    @field_validator("bootstrap_peers")
    @classmethod
    def _host_port(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                peer_address(item, "bootstrap peer")
            except UsageError as exc:
                raise ValueError(exc.one_line()) from exc
        return value


def error_text(err: Any) -> str:
    """A pydantic error's message, without the "Value error, " pydantic puts before the text of our validators."""
    return str(err["msg"]).removeprefix("Value error, ")
