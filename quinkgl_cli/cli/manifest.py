"""`quinkgl manifest create|verify|show|arch-hash`: signed swarm manifests (.qgl files)."""

from pathlib import Path
from typing import Annotated, Any

import typer

from quinkgl_cli.cli.output import parse_kv
from quinkgl_cli.errors import ArchMismatch, IOFailure, UsageError

manifest_app = typer.Typer(
    name="manifest",
    help="Create, verify and inspect signed swarm manifests (.qgl).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

_PASSPHRASE_HELP = "Passphrase of the --sign-with key, first line of this file (else $QUINKGL_KEY_PASSPHRASE)."
_TRUST_HELP = "open | tofu | pinned (default, as for `run`: pinned when --trusted-pubkey is given, else tofu)."
_STATE_HELP = "Directory of the TOFU store (default: $QUINKGL_HOME, else ~/.local/state/quinkgl)."
_KV = "K=V"


@manifest_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Swarm name (letters, digits, . _ -); TOFU remembers its creator.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest file to write (.qgl).", metavar="FILE")],
    aggregation: Annotated[str, typer.Option("--aggregation", metavar="NAME", help="Aggregation strategy, e.g. FedAvg, Krum, TrimmedMean.")],
    topology: Annotated[str, typer.Option("--topology", metavar="NAME", help="Peer selection, e.g. RotationTopology (the default the guides use), RandomTopology, CyclonTopology.")],
    task_type: Annotated[str, typer.Option("--task-type", metavar="TYPE", help="class | regr | seg | det (long forms accepted).")],
    label_type: Annotated[str, typer.Option("--label-type", metavar="TYPE", help="integer | float | one_hot.")],
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", metavar="SHAPE", help="Per-sample input shape, e.g. 1,28,28 (--from-script may infer it).")
    ] = None,
    output_shape: Annotated[
        str | None, typer.Option("--output-shape", metavar="SHAPE", help="Model output shape, e.g. 10 (--from-script infers it).")
    ] = None,
    model_framework: Annotated[str, typer.Option("--model-framework", metavar="NAME", help="pytorch | tensorflow | custom.")] = "pytorch",
    model_arch_hash: Annotated[
        str | None, typer.Option("--model-arch-hash", metavar="HASH", help="sha256:<hex> of the model structure (or use --from-script).")
    ] = None,
    from_script: Annotated[
        Path | None,
        typer.Option("--from-script", help="Peer script whose build_model fills the arch hash and shapes.", metavar="FILE"),
    ] = None,
    from_data: Annotated[
        str | None,
        typer.Option("--data", metavar="NAME", help="Like --from-script, for the model of `quinkgl run --data NAME` (digits, mnist, cifar10)."),
    ] = None,
    script_arg: Annotated[list[str] | None, typer.Option("--script-arg", help="k=v passed to build_model (repeatable).", metavar=_KV)] = None,
    sign_with: Annotated[
        Path | None, typer.Option("--sign-with", help="Creator private key (PEM) to sign with; without it the manifest is unsigned.", metavar="KEY")
    ] = None,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", help=_PASSPHRASE_HELP, metavar="FILE")] = None,
    round_limit: Annotated[int | None, typer.Option("--round-limit", metavar="N", help="Maximum number of rounds.")] = None,
    byzantine_f: Annotated[int, typer.Option("--byzantine-f", metavar="N", help="Number of Byzantine peers to tolerate.")] = 0,
    expires_at: Annotated[
        str | None, typer.Option("--expires-at", metavar="DATE", help="Expiry: a date (valid through that day, UTC) or an ISO 8601 time.")
    ] = None,
    bootstrap_peer: Annotated[list[str] | None, typer.Option("--bootstrap-peer", metavar="HOST:PORT", help="host:port of a peer to contact first (repeatable).")] = None,
    description: Annotated[str, typer.Option("--description", metavar="TEXT", help="Free text shown by `manifest show`.")] = "",
    aggregation_param: Annotated[list[str] | None, typer.Option("--aggregation-param", help="Aggregation parameter (repeatable).", metavar=_KV)] = None,
    topology_param: Annotated[list[str] | None, typer.Option("--topology-param", help="Topology parameter (repeatable).", metavar=_KV)] = None,
    training_param: Annotated[
        list[str] | None, typer.Option("--training-param", help="local_epochs, local_steps, gossip_steps, ... (repeatable).", metavar=_KV)
    ] = None,
    compression_param: Annotated[
        list[str] | None, typer.Option("--compression-param", help="top_k_ratio, quantize_bits, lossless, ... (repeatable).", metavar=_KV)
    ] = None,
    privacy_param: Annotated[
        list[str] | None, typer.Option("--privacy-param", help="fingerprint, fingerprint_noise, gradient_moments (repeatable).", metavar=_KV)
    ] = None,
    dp_epsilon: Annotated[float | None, typer.Option("--dp-epsilon", metavar="X", help="Local DP epsilon per shared update (local_update; unset: DP off).")] = None,
    dp_delta: Annotated[float | None, typer.Option("--dp-delta", metavar="X", help="Local DP delta (default 1e-5).")] = None,
    dp_clip_norm: Annotated[float | None, typer.Option("--dp-clip-norm", metavar="X", help="L2 clip of each shared update (default 1.0).")] = None,
    dp_total_epsilon: Annotated[
        float | None, typer.Option("--dp-total-epsilon", metavar="X", help="Whole-run privacy budget per peer (dp_sgd: its target); a peer stops once it is spent.")
    ] = None,
    privacy_mode: Annotated[
        str | None, typer.Option("--privacy-mode", metavar="MODE",
                                 help="local_update (default: DP of each shared update) | dp_sgd (DP-SGD, whole-run budget).")
    ] = None,
    dp_max_noise_multiplier: Annotated[
        float | None, typer.Option("--dp-max-noise-multiplier", metavar="X",
                                   help="dp_sgd: refuse runs whose budget needs more noise than this (default 30).")
    ] = None,
    membership: Annotated[
        str, typer.Option("--membership", metavar="MODE",
                          help="open (any node holding the manifest) | certified (only nodes with a `quinkgl admit` certificate; needs --sign-with).")
    ] = "open",
    personalization: Annotated[
        str, typer.Option("--personalization", metavar="MODE", help="none | apfl (local model mixed with the shared one) | fedrep (personal head, shared backbone).")
    ] = "none",
    personalization_param: Annotated[
        list[str] | None, typer.Option("--personalization-param", help="apfl: alpha, alpha_lr; fedrep: head_prefixes, head_epochs (repeatable).", metavar=_KV)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
) -> None:
    """Create a swarm manifest, signed with --sign-with (peers under tofu/pinned refuse unsigned ones)."""
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.canonical import swarm_id
    from quinkgl_cli.manifest.create import build_manifest, normalize_arch_hash, normalize_framework
    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest

    if output.exists() and not force:
        raise IOFailure(f"{output} already exists", "choose another --output or pass --force to replace it")
    key = keys.load_private_key(sign_with, keys.read_passphrase(passphrase_file)) if sign_with is not None else None

    if from_data is not None:
        from quinkgl_cli.peer_scripts import builtin_script

        if from_script is not None:
            raise UsageError("--from-script and --data exclude each other", "--data NAME stands for the script quinkgl ships for NAME")
        from_script = builtin_script(from_data)
    if from_script is not None:
        if normalize_framework(model_framework) == "tensorflow":
            # The hash would be a PyTorch model's under a label no peer here can train: a swarm nobody can join.
            raise UsageError(
                f"--model-framework tensorflow contradicts {'--data' if from_data else '--from-script'}: its model is a PyTorch"
                " nn.Module, and quinkgl trains PyTorch models",
                "drop --model-framework (pytorch is the default)",
            )
        arch, input_shape, output_shape = _from_script(from_script, parse_kv(script_arg, "--script-arg"), input_shape, output_shape)
        if model_arch_hash is not None and normalize_arch_hash(model_arch_hash) != arch:
            raise ArchMismatch(
                f"--model-arch-hash {model_arch_hash} differs from the hash of {from_script}'s model ({arch})",
                "drop --model-arch-hash, or check that the script builds the intended model",
            )
        model_arch_hash = arch
    missing = [flag for flag, value in (("--model-arch-hash", model_arch_hash), ("--input-shape", input_shape), ("--output-shape", output_shape)) if value is None]
    if missing:
        raise UsageError(f"manifest create needs {', '.join(missing)}", "pass them, or --from-script peer_script.py to fill them")

    privacy: dict[str, Any] = dict(parse_kv(privacy_param, "--privacy-param"))
    if privacy_mode is not None and privacy_mode.strip().lower() not in ("local_update", "dp_sgd"):
        raise UsageError(f"--privacy-mode {privacy_mode!r} is not a privacy mode", "valid: local_update, dp_sgd")
    for field, value in (("mode", privacy_mode.strip().lower() if privacy_mode else None), ("dp_epsilon", dp_epsilon),
                         ("dp_delta", dp_delta), ("dp_clip_norm", dp_clip_norm), ("dp_total_epsilon", dp_total_epsilon),
                         ("max_noise_multiplier", dp_max_noise_multiplier)):
        if value is not None:
            if field in privacy:
                raise UsageError(f"{field} given twice", f"use --{field.replace('_', '-')} or --privacy-param {field}=..., not both")
            privacy[field] = value

    manifest = build_manifest(
        name=name,
        task_type=task_type,
        input_shape=input_shape,  # type: ignore[arg-type]
        output_shape=output_shape,  # type: ignore[arg-type]
        label_type=label_type,
        framework=model_framework,
        arch_hash=model_arch_hash,  # type: ignore[arg-type]
        aggregation=aggregation,
        topology=topology,
        aggregation_params=parse_kv(aggregation_param, "--aggregation-param"),
        topology_params=parse_kv(topology_param, "--topology-param"),
        round_limit=round_limit,
        byzantine_f=byzantine_f,
        expires_at=expires_at,
        bootstrap_peers=bootstrap_peer or [],
        description=description,
        training_params=parse_kv(training_param, "--training-param"),
        compression_params=parse_kv(compression_param, "--compression-param"),
        privacy_params=privacy,
        membership=membership,
        personalization=personalization,
        personalization_params=parse_kv(personalization_param, "--personalization-param"),
    )
    if manifest.membership == "certified" and key is None:
        raise UsageError("--membership certified needs --sign-with", "certificates are signed with the manifest's creator key")
    if key is not None:
        manifest = sign_manifest(manifest, key)
    # Canonicalized before anything is written: a manifest that cannot be must leave no file behind.
    identity = swarm_id(manifest)
    write_manifest(output, manifest, overwrite=force)
    typer.echo(f"Manifest written to {output}")
    typer.echo(f"Swarm ID: {identity}")
    if manifest.creator_pubkey:
        typer.echo(f"Signature: signed by {manifest.creator_pubkey}")
    else:
        typer.echo("Signature: none (unsigned manifest)")
        typer.echo("warning: unsigned: peers using --trust-policy tofu or pinned will refuse it; sign with --sign-with KEY", err=True)


def _from_script(
    script_path: Path, script_args: dict[str, str], input_shape: str | None, output_shape: str | None
) -> tuple[str, str | None, str | None]:
    """Arch hash of the script's model, plus its input/output shapes where the model reveals them.

    build_model runs with ``manifest=None``: the manifest does not exist yet.
    """
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import parse_shape
    from quinkgl_cli.manifest.shapes import output_kind, probe_shapes

    model = _build_model(script_path, script_args)
    arch = compute_arch_hash(model)
    given = parse_shape(input_shape, "--input-shape") if input_shape is not None else None
    probed_in, probed_out = probe_shapes(model, given)
    if output_shape is not None and probed_out is not None and parse_shape(output_shape, "--output-shape") != probed_out:
        raise ArchMismatch(
            f"--output-shape {output_shape} differs from what {script_path}'s model outputs ({','.join(map(str, probed_out))})",
            "drop --output-shape, or fix the model",
        )
    if output_shape is not None:
        out = output_shape
    elif probed_out is not None:
        out = ",".join(map(str, probed_out))
    else:
        raise UsageError(
            f"cannot infer the output shape: {script_path}'s model returns a {output_kind(model, probed_in)}, not one tensor",
            "pass --output-shape (per sample), or make forward return the one prediction tensor the task's loss takes",
        )
    return arch, ",".join(map(str, probed_in)), out


def _build_model(script_path: Path, script_args: dict[str, str]) -> Any:
    from quinkgl_cli.errors import NodeConfigError
    from quinkgl_cli.node.script import load_script

    script = load_script(script_path)
    try:
        return script.build_model(None, **script_args)
    except NodeConfigError as exc:
        if "NoneType" not in exc.message:
            raise
        raise NodeConfigError(
            exc.message, "build_model is called with manifest=None here (the manifest does not exist yet); make it work without it"
        ) from exc


@manifest_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="Manifest file (.qgl).", metavar="FILE")],
    trusted_pubkey: Annotated[
        list[str] | None,
        typer.Option("--trusted-pubkey", help="Creator key to accept, ed25519:<hex> or a file holding it (repeatable).", metavar="KEY"),
    ] = None,
    trust_policy: Annotated[str | None, typer.Option("--trust-policy", metavar="POLICY", help=_TRUST_HELP)] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help=_STATE_HELP, metavar="DIR")] = None,
) -> None:
    """Check a manifest's schema, signature, dates and trust policy; exit 0 only if `run` would accept it.

    Read-only: under tofu a creator key not seen before is reported, not remembered (`run` remembers it)."""
    from quinkgl_cli.manifest.trust import load_trusted

    keys = tuple(trusted_pubkey or ())
    policy = trust_policy if trust_policy is not None else ("pinned" if keys else "tofu")
    trusted = load_trusted(file, policy, keys, state_dir, remember=False)
    manifest = trusted.manifest
    typer.echo("Manifest valid.")
    typer.echo(f"Swarm ID: {trusted.swarm_id}")
    typer.echo("Signature: valid" if trusted.signed else "Signature: none (unsigned manifest)")
    if manifest.creator_pubkey:
        typer.echo(f"Creator: {manifest.creator_pubkey}")
    detail = {
        "open": "open (no creator key required)",
        "pinned": "pinned (creator key is trusted)",
        "tofu": "tofu (creator key "
        + ("not seen before: `run` will remember it" if trusted.tofu == "first-use" else "matches the one first seen")
        + ")",
    }[trusted.policy]
    typer.echo(f"Trust: {detail}")
    if manifest.expires_at is not None:
        typer.echo(f"Expires: {_iso(manifest.expires_at)}")


@manifest_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(help="Manifest file (.qgl).", metavar="FILE")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead.")] = False,
) -> None:
    """Display a manifest and its signature status (no trust policy applied: use `verify` for that)."""
    import json

    from quinkgl_cli.errors import CryptoError
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.manifest.signing import verify_signature

    loaded = load_manifest(file)
    m = loaded.manifest
    try:
        status = "valid" if verify_signature(loaded.canonical, m.creator_pubkey, m.signature) else "unsigned"
    except CryptoError:
        status = "INVALID"
    if as_json:
        doc = {"swarm_id": loaded.swarm_id, "signature_status": status, "manifest": loaded.raw}
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    _render(loaded.swarm_id, status, m)


def _render(swarm_id: str, status: str, m: Any) -> None:
    from rich.console import Console

    from quinkgl_cli.manifest.canonical import data_schema_hash

    def params(p: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"

    def spec(obj: Any) -> str:
        return ", ".join(f"{k}={v}" for k, v in obj.model_dump().items() if v is not None)

    sig = {"valid": "[green]valid[/]", "unsigned": "[yellow]none (unsigned manifest)[/]", "INVALID": "[bold red]INVALID[/]"}[status]
    rows = [
        ("Name", m.name),
        ("Swarm ID", swarm_id),
        ("Signature", sig),
        ("Creator", m.creator_pubkey or "-"),
        ("Description", m.description or "-"),
        ("Created", _iso(m.created_at)),
        ("Expires", _iso(m.expires_at) if m.expires_at else "never"),
        ("Task", f"{m.task.type}, input {_shape(m.task.input_shape)}, output {_shape(m.task.output_shape)}, labels {m.task.label_type}"),
        ("Data schema", m.data_schema_hash + ("" if m.data_schema_hash == data_schema_hash(m.task) else " (DOES NOT MATCH the task)")),
        ("Model", f"{m.model.framework} {m.model.arch_hash}"),
        ("Aggregation", f"{m.aggregation.name} ({params(m.aggregation.params)})"),
        ("Topology", f"{m.topology.name} ({params(m.topology.params)})"),
        ("Training", spec(m.training)),
        ("Compression", spec(m.compression) if m.compression.enabled else "off"),
        ("Privacy", spec(m.privacy) if m.privacy.any_dp else f"DP off; {spec(m.privacy)}"),
        ("Round limit", str(m.round_limit) if m.round_limit else "none"),
        ("Byzantine f", str(m.byzantine_f)),
        ("Bootstrap", ", ".join(m.bootstrap_peers) or "-"),
        ("Membership", m.membership),
    ]
    # Plain "label  value" lines, never folded: hashes and keys must stay copy-pasteable.
    console = Console(soft_wrap=True, highlight=False)
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        shown = value if label == "Signature" else _escape(value)
        console.print(f"[bold]{label + ':':<{width}}[/]{shown}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _shape(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def _iso(value: Any) -> str:
    from datetime import UTC

    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@manifest_app.command("arch-hash")
def arch_hash(
    script: Annotated[Path, typer.Option("--script", help="Peer script whose build_model(None, **script_args) builds the model.", metavar="FILE")],
    script_arg: Annotated[list[str] | None, typer.Option("--script-arg", help="k=v passed to build_model (repeatable).", metavar=_KV)] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Also print what is hashed, one module per line (diff two peers).")] = False,
) -> None:
    """Print the architecture hash (sha256:<hex>) of a peer script's model, for --model-arch-hash."""
    import json

    from quinkgl_cli.manifest.arch_hash import compute_arch_hash, describe_model

    model = _build_model(script, parse_kv(script_arg, "--script-arg"))
    typer.echo(compute_arch_hash(model))
    if explain:
        for record in describe_model(model):
            typer.echo(json.dumps(record, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.add_typer(manifest_app, name="manifest")
