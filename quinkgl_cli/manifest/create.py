"""Building a manifest from `manifest create`'s inputs: every value parsed, normalized and validated here.

The result is unsigned; :func:`quinkgl_cli.manifest.signing.sign_manifest` signs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time
from typing import Any

from pydantic import BaseModel, ValidationError

from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest import catalogue
from quinkgl_cli.manifest.canonical import data_schema_hash
from quinkgl_cli.manifest.personalization import MODES, PersonalizationSpec, idle_message
from quinkgl_cli.manifest.schema import (
    DP_TUNING,
    CompressionSpec,
    Framework,
    LabelType,
    Manifest,
    Membership,
    ModelSpec,
    PrivacySpec,
    StrategySpec,
    TaskSpec,
    TaskType,
    TrainingSpec,
    error_text,
    idle_compression_message,
    idle_dp_message,
)

TASK_TYPES: dict[str, TaskType] = {
    "class": "classification",
    "classification": "classification",
    "regr": "regression",
    "regression": "regression",
    "seg": "segmentation",
    "segmentation": "segmentation",
    "det": "detection",
    "detection": "detection",
}
LABEL_TYPES: dict[str, LabelType] = {"integer": "integer", "int": "integer", "float": "float", "one_hot": "one_hot", "one-hot": "one_hot", "onehot": "one_hot"}
FRAMEWORKS: tuple[Framework, ...] = ("pytorch", "tensorflow", "custom")
_HEX64 = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})$")
_INT = re.compile(r"^[+-]?\d+$")

# Where a schema field comes from on the command line, so an error names the flag the user typed.
_FLAG_OF = {
    "name": "--name",
    "description": "--description",
    "expires_at": "--expires-at",
    "task.type": "--task-type",
    "task.input_shape": "--input-shape",
    "task.output_shape": "--output-shape",
    "task.label_type": "--label-type",
    "model.framework": "--model-framework",
    "model.arch_hash": "--model-arch-hash",
    "round_limit": "--round-limit",
    "byzantine_f": "--byzantine-f",
    "bootstrap_peers": "--bootstrap-peer",
}


def normalize_task_type(value: str) -> TaskType:
    found = TASK_TYPES.get(value.strip().lower())
    if found is None:
        raise UsageError(f"--task-type {value!r} is not a task type", "valid: class, regr, seg, det (or their long forms)")
    return found


def normalize_label_type(value: str) -> LabelType:
    found = LABEL_TYPES.get(value.strip().lower())
    if found is None:
        raise UsageError(f"--label-type {value!r} is not a label type", "valid: integer, float, one_hot")
    return found


def normalize_membership(value: str) -> Membership:
    found = value.strip().lower()
    if found == "open":
        return "open"
    if found == "certified":
        return "certified"
    raise UsageError(f"--membership {value!r} is not open or certified",
                     "open: any node with the manifest may join; certified: only nodes holding a `quinkgl admit` certificate")


def normalize_framework(value: str) -> Framework:
    found = value.strip().lower()
    for framework in FRAMEWORKS:
        if framework == found:
            return framework
    raise UsageError(f"--model-framework {value!r} is not a framework", f"valid: {', '.join(FRAMEWORKS)}")


def normalize_arch_hash(value: str) -> str:
    match = _HEX64.match(value.strip())
    if not match:
        raise UsageError(
            f"--model-arch-hash {value!r} is not sha256:<64 hex digits>",
            "compute it with `quinkgl manifest arch-hash --script peer_script.py`, or use --from-script",
        )
    return "sha256:" + match.group(2).lower()


def parse_shape(value: str | Sequence[int], flag: str) -> tuple[int, ...]:
    """``"1,28,28"`` (also ``1x28x28`` or ``(1, 28, 28)``) into a tuple of positive ints."""
    if not isinstance(value, str):
        dims = tuple(int(d) for d in value)
    else:
        text = value.strip().strip("()[]").replace("x", ",").replace(" ", "")
        parts = [p for p in text.split(",") if p != ""] if text else []
        if not parts or not all(_INT.match(p) for p in parts):
            raise UsageError(f"{flag} {value!r} is not a shape", f"write it as comma-separated sizes, e.g. {flag} 1,28,28")
        dims = tuple(int(p) for p in parts)
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"{flag} {value!r}: every dimension must be a positive integer", f"e.g. {flag} 1,28,28")
    return dims


def parse_expires(value: str, now: datetime) -> datetime:
    """A date (valid through the end of that day, UTC) or an ISO 8601 datetime (UTC when it has no zone)."""
    text = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.combine(date.fromisoformat(text), time(23, 59, 59), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError as exc:
        raise UsageError(
            f"--expires-at {value!r} is not a date or ISO 8601 time", "e.g. --expires-at 2026-12-31 or 2026-12-31T18:00:00Z"
        ) from exc
    if moment <= now:
        raise UsageError(f"--expires-at {value!r} is in the past", "give a future date")
    return moment.astimezone(UTC)


def coerce_value(text: str) -> Any:
    """A ``k=v`` flag's value as the JSON value it spells: true/false, none/null, integer, number, else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _INT.match(lowered):
        return int(lowered)
    try:
        return float(lowered)
    except ValueError:
        return text


def _spec(model: type[BaseModel], values: Mapping[str, Any], flag: str) -> Any:
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UsageError(
            f"{flag} {where}: {error_text(err)}" if where else f"{flag} {error_text(err)}",
            f"valid parameters: {', '.join(model.model_fields)}",
        ) from exc


def _compression(params: Mapping[str, str] | None) -> CompressionSpec:
    values = _coerced(params)
    spec: CompressionSpec = _spec(CompressionSpec, values, "--compression-param")
    idle = spec.idle_tuning(values)
    if idle:
        raise UsageError(f"--compression-param {idle_compression_message(idle)}", "drop those settings, or turn compression on")
    return spec


# `manifest create`'s DP flags and what they set under privacy mode dp_sgd (its `dp_sgd` section).
DP_SGD_FLAGS = {"dp_total_epsilon": "epsilon", "dp_delta": "delta", "dp_clip_norm": "clip_norm",
                "max_noise_multiplier": "max_noise_multiplier"}


def _dp_sgd_privacy(values: dict[str, Any]) -> PrivacySpec:
    """Privacy mode dp_sgd: ``--dp-total-epsilon`` is the run's budget; fingerprints stay home unless asked for
    (and then the schema refuses them)."""
    if values.get("dp_epsilon") is not None:
        raise UsageError("--dp-epsilon is the per-round epsilon of privacy mode local_update",
                         "under --privacy-mode dp_sgd give the whole run's budget with --dp-total-epsilon")
    if values.get("dp_total_epsilon") is None:
        raise UsageError("--privacy-mode dp_sgd needs --dp-total-epsilon (the whole run's epsilon per peer)",
                         "e.g. --dp-total-epsilon 8 --dp-delta 1e-5")
    section = {DP_SGD_FLAGS[k]: values.pop(k) for k in list(values) if k in DP_SGD_FLAGS}
    values.setdefault("fingerprint", False)
    values.setdefault("gradient_moments", False)
    values["dp_sgd"] = section
    return _spec(PrivacySpec, values, "--privacy-param")  # type: ignore[no-any-return]


def _privacy(params: Mapping[str, Any] | None) -> PrivacySpec:
    values = _coerced(params)
    if values.get("mode") == "dp_sgd":
        return _dp_sgd_privacy(values)
    if values.get("max_noise_multiplier") is not None:
        raise UsageError("--dp-max-noise-multiplier applies to --privacy-mode dp_sgd only", "drop it, or use dp_sgd")
    idle = [k for k in DP_TUNING if k in values] if values.get("dp_epsilon") is None else []
    if idle:
        flags = ["--" + k.replace("_", "-") for k in idle]
        raise UsageError(idle_dp_message(flags, "--dp-epsilon"), "give --dp-epsilon to turn local DP on, or drop those flags")
    return _spec(PrivacySpec, values, "--privacy-param")


def personalization_spec(mode: str, params: Mapping[str, str] | None) -> PersonalizationSpec:
    """The personalization section from ``--personalization`` and its ``k=v`` params (`manifest create`, `simulate`)."""
    chosen = mode.strip().lower()
    if chosen not in MODES:
        raise UsageError(f"--personalization {mode!r} is not a personalization mode", f"valid: {', '.join(MODES)}")
    values = _coerced(params)
    if "mode" in values:
        raise UsageError("--personalization-param mode=... is not a parameter", f"use --personalization {values['mode']}")
    if "head_prefixes" in values:  # comma-separated on the command line; a prefix that reads as a number stays text
        text = str((params or {})["head_prefixes"])
        values["head_prefixes"] = tuple(p.strip() for p in text.split(",") if p.strip())
    spec: PersonalizationSpec = _spec(PersonalizationSpec, {**values, "mode": chosen}, "--personalization-param")
    idle = spec.idle_tuning(tuple(values))
    if idle:
        raise UsageError(f"--personalization-param {idle_message(idle, chosen)}", "drop those settings, or choose their mode")
    return spec


def _strategy(kind: str, name: str, params: Mapping[str, str] | None) -> StrategySpec:
    entry = catalogue.resolve(kind, name)  # type: ignore[arg-type]
    typed = catalogue.validate_params(entry, dict(params or {}))
    return StrategySpec(name=entry.name, params=typed)


def build_manifest(
    *,
    name: str,
    task_type: str,
    input_shape: str | Sequence[int],
    output_shape: str | Sequence[int],
    label_type: str,
    framework: str,
    arch_hash: str,
    aggregation: str,
    topology: str,
    aggregation_params: Mapping[str, str] | None = None,
    topology_params: Mapping[str, str] | None = None,
    round_limit: int | None = None,
    byzantine_f: int = 0,
    expires_at: str | datetime | None = None,
    bootstrap_peers: Sequence[str] = (),
    description: str = "",
    training_params: Mapping[str, str] | None = None,
    compression_params: Mapping[str, str] | None = None,
    privacy_params: Mapping[str, Any] | None = None,
    membership: str = "open",
    personalization: str = "none",
    personalization_params: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> Manifest:
    """An unsigned manifest, ``created_at`` = ``now`` (the clock, to the second). Bad input: UsageError (1).

    ``*_params`` hold strings as typed on the command line (``k=v``); they are typed by the matching schema.
    ``privacy_params`` may also hold already typed values (the ``--dp-*`` flags).
    """
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    task = _task(task_type, input_shape, output_shape, label_type)
    expiry = parse_expires(expires_at, now) if isinstance(expires_at, str) else expires_at
    peers = tuple(p.strip() for p in bootstrap_peers)
    try:
        return Manifest(
            name=name,
            description=description,
            created_at=now,
            expires_at=expiry,
            task=task,
            data_schema_hash=data_schema_hash(task),
            model=ModelSpec(framework=normalize_framework(framework), arch_hash=normalize_arch_hash(arch_hash)),
            aggregation=_strategy("aggregation", aggregation, aggregation_params),
            topology=_strategy("topology", topology, topology_params),
            training=_spec(TrainingSpec, _coerced(training_params), "--training-param"),
            compression=_compression(compression_params),
            privacy=_privacy(privacy_params),
            personalization=personalization_spec(personalization, personalization_params),
            round_limit=round_limit,
            byzantine_f=byzantine_f,
            bootstrap_peers=peers,
            membership=normalize_membership(membership),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
        flag = _FLAG_OF.get(where, where or "manifest")
        if where == "name" and err["type"] == "string_pattern_mismatch":
            raise UsageError(
                f"--name {name!r} has characters a swarm name cannot have",
                "use letters, digits, '.', '_' and '-', starting with a letter or digit",
            ) from exc
        # A rule across fields (loc empty) names its fields itself.
        text = f"{flag}: {error_text(err)}" if where else error_text(err)
        raise UsageError(text, "see `quinkgl manifest create --help`") from exc


def _task(task_type: str, input_shape: str | Sequence[int], output_shape: str | Sequence[int], label_type: str) -> TaskSpec:
    try:
        return TaskSpec(
            type=normalize_task_type(task_type),
            input_shape=parse_shape(input_shape, "--input-shape"),
            output_shape=parse_shape(output_shape, "--output-shape"),
            label_type=normalize_label_type(label_type),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = _FLAG_OF.get("task." + ".".join(str(x) for x in err["loc"] if not isinstance(x, int)), "task")
        raise UsageError(f"{flag}: {error_text(err)}", "see `quinkgl manifest create --help`") from exc


def _coerced(values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: coerce_value(v) if isinstance(v, str) else v for k, v in (values or {}).items()}
