"""`quinkgl run`: start a peer daemon (flags parsed here; the work is in `quinkgl_cli.node.daemon`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quinkgl_cli import validation
from quinkgl_cli.cli import netflags as nf
from quinkgl_cli.cli.output import check_output_file, parse_kv
from quinkgl_cli.cli.stopsignals import stop_as_interrupt
from quinkgl_cli.errors import UsageError

if TYPE_CHECKING:
    from quinkgl_cli.cli.config_file import Flag

_KV = "K=V"


def _bool_flag(value: str, flag: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"{flag} {value!r} is not true or false", f"write {flag} true or {flag} false")


def _peer_script(script: Path | None, data: str | None) -> Path:
    """Mode B (--script FILE) or mode A (--data NAME, one of the scripts quinkgl ships): exactly one of them."""
    if script is not None and data is None:
        return script
    if data is not None and script is None:
        from quinkgl_cli.peer_scripts import builtin_script

        return builtin_script(data)
    raise UsageError(
        "quinkgl run needs either --script FILE or --data NAME" if script is None else "--script and --data exclude each other",
        "--script peer_script.py (your model and data) or --data digits|mnist|cifar10 (a shipped one)",
    )


def _apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    # Eager, so the file's values become the defaults of every flag parsed after it; given flags still win.
    if value is not None:
        from quinkgl_cli.cli.config_file import config_defaults, flags_of

        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(value, flags_of(ctx.command.params, run))}
    return value


def config_flags() -> dict[str, Flag]:
    """The keys a `run --config` file may hold: run's flags, from its option parser (also `doctor --config`'s)."""
    from quinkgl_cli.cli.app import build_app
    from quinkgl_cli.cli.config_file import flags_of

    group = typer.main.get_command(build_app(("run",)))
    if not isinstance(group, typer.core.TyperGroup):
        raise TypeError("build_app's app should be a command group")
    return flags_of(group.commands["run"].params, run)


def run(
    ctx: typer.Context,
    manifest: nf.Manifest,
    script: Annotated[
        Path | None, typer.Option("--script", "-s", help="Peer script with build_model and build_loaders (mode B).", metavar="FILE")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", metavar="NAME", help="Mode A, instead of --script: a shipped model and data set, digits "
                     "(offline), mnist or cifar10 (torchvision; --script-arg data_root=DIR, download=true)."),
    ] = None,
    node_id: nf.NodeId = None,
    port: nf.Port = 0,
    listen: nf.Listen = "127.0.0.1",
    rounds: Annotated[
        int | None, typer.Option("--rounds", metavar="N", help="Rounds to run (default: the manifest's round limit, else until stopped).")
    ] = None,
    gossip_interval: Annotated[
        float, typer.Option("--gossip-interval", metavar="SECONDS", help="Seconds between round starts (a late round starts at once).")
    ] = 10.0,
    trust_policy: nf.TrustPolicy = None,
    trusted_pubkey: nf.TrustedPubkey = None,
    certificate: nf.Certificate = None,
    revocations: nf.Revocations = None,
    script_arg: Annotated[
        list[str] | None, typer.Option("--script-arg", help="k=v handed to build_model/build_loaders (repeatable).", metavar=_KV)
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option("--checkpoint-dir", help="Where checkpoints go (default: $QUINKGL_HOME/checkpoints/<swarm>/<node-id>).", metavar="DIR"),
    ] = None,
    bootstrap_peer: nf.BootstrapPeer = None,
    strict_manifest: Annotated[
        str, typer.Option("--strict-manifest", metavar="true|false", help="true: refuse a model whose arch hash differs from the manifest's; false: warn.")
    ] = "true",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint of this swarm (default) or start afresh.")
    ] = True,
    log_format: Annotated[str, typer.Option("--log-format", metavar="FORMAT", help="text | json (one event per line on stdout).")] = "text",
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="debug | info | warning | error.")] = "info",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Verify the manifest, load the script, build the model, check the hash, exit.")
    ] = False,
    state_dir: nf.StateDir = None,
    local_epochs: Annotated[int | None, typer.Option("--local-epochs", metavar="N", help="Override the manifest's local epochs per round.")] = None,
    local_steps: Annotated[int | None, typer.Option("--local-steps", metavar="N", help="Override the manifest's cap on optimizer steps per round.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", metavar="N", help="Save a checkpoint every N rounds.")] = 1,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", metavar="N", help="How many checkpoints to keep.")] = 3,
    seed: Annotated[
        int | None, typer.Option("--seed", metavar="N", help="Seed of model init and RNGs (default: derived from the swarm id, same on every peer).")
    ] = None,
    final_model: Annotated[
        Path | None,
        typer.Option("--final-model", help="Where to write the final model (default: <checkpoint-dir>/final_model.safetensors).", metavar="FILE"),
    ] = None,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", metavar="N", help="Threads torch may use for training.")] = None,
    min_peers: Annotated[
        int, typer.Option("--min-peers", metavar="N", help="Before round 1, wait until this many peers are known (0: start at once).")
    ] = 0,
    min_peers_timeout: Annotated[
        float, typer.Option("--min-peers-timeout", metavar="SECONDS", help="Seconds to wait for --min-peers before starting anyway.")
    ] = 60.0,
    public_bootstrap: nf.PublicBootstrap = False,
    lan_discovery: nf.LanDiscovery = False,
    relay: nf.Relay = False,
    relay_rate: nf.RelayRate = 50.0,
    rendezvous: nf.Rendezvous = True,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file of these flags (keys without dashes); flags given here win.",
                     metavar="FILE", is_eager=True, callback=_apply_config),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", metavar="PORT", help="Serve Prometheus metrics on this TCP port (0: any free one).")
    ] = None,
    metrics_listen: Annotated[
        str, typer.Option("--metrics-listen", help="Address of the metrics endpoint.", metavar="ADDR")
    ] = "127.0.0.1",
    metrics_file: Annotated[
        Path | None, typer.Option("--metrics-file", help="Append each round's metrics to this JSON-lines file.", metavar="FILE")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Also write the log to this file, rotated by size.", metavar="FILE")
    ] = None,
    log_max_bytes: Annotated[
        int, typer.Option("--log-max-bytes", metavar="BYTES", help="Rotate --log-file when it would grow past this many bytes.")
    ] = 10_000_000,
    log_backups: Annotated[int, typer.Option("--log-backups", metavar="N", help="Rotated --log-file copies to keep.")] = 5,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", metavar="FILE",
                     help="Append this run's trace (training times, transfers, peers coming and going; JSON lines) for `simulate` to replay."),
    ] = None,
) -> None:
    """Join the swarm of a trusted manifest and train with your peer script, gossiping with peers."""
    stop_as_interrupt(ctx)  # start-up (loading torch, the script, the model) stops as Ctrl-C does, exit 130
    from quinkgl_cli.node.options import DaemonOptions, default_node_id
    from quinkgl_cli.ops.observer import OpsSettings

    peer_script = _peer_script(script, data)
    args = parse_kv(script_arg, "--script-arg")
    strict = _bool_flag(strict_manifest, "--strict-manifest")
    nid = validation.node_id(node_id if node_id is not None else default_node_id())
    network = nf.network_options(listen=listen, port=port, bootstrap_peer=bootstrap_peer, public_bootstrap=public_bootstrap,
                                 lan_discovery=lan_discovery, relay=relay, relay_rate=relay_rate, rendezvous=rendezvous)
    if rounds is not None and rounds < 1:
        raise UsageError(f"--rounds {rounds} must be at least 1")
    if not gossip_interval > 0:
        raise UsageError(f"--gossip-interval {gossip_interval} must be positive")
    for flag, value in (("--local-epochs", local_epochs), ("--local-steps", local_steps), ("--checkpoint-every", checkpoint_every),
                        ("--keep-checkpoints", keep_checkpoints), ("--torch-threads", torch_threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be at least 1")
    if min_peers < 0 or min_peers_timeout < 0:
        raise UsageError("--min-peers and --min-peers-timeout must not be negative")
    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format {log_format!r} is not text or json")
    if metrics_port is not None:
        validation.listen_port(metrics_port, "--metrics-port")
    metrics_listen = validation.listen_address(metrics_listen, "--metrics-listen")
    if log_max_bytes < 1 or log_backups < 0:
        raise UsageError("--log-max-bytes must be at least 1 and --log-backups not negative")
    # The log opens first, before the run has made its checkpoint directory; the other outputs open after.
    check_output_file(log_file, "--log-file")
    for path, flag in ((final_model, "--final-model"), (metrics_file, "--metrics-file"), (trace, "--trace")):
        check_output_file(path, flag, made_by_run=checkpoint_dir)
    if script is not None:  # the flags' checks first, then the file, not after the manifest was trusted (seconds)
        from quinkgl_cli.node.script import check_script_file

        check_script_file(peer_script)
    keys = list(trusted_pubkey or [])
    policy = trust_policy if trust_policy is not None else ("pinned" if keys else "tofu")
    options = DaemonOptions.from_flags(
        manifest=manifest,
        script=peer_script,
        node_id=nid,
        rounds=rounds,
        gossip_interval=gossip_interval,
        trust_policy=policy,
        trusted_pubkeys=keys,
        certificate=certificate,
        revocations=revocations,
        script_args=args,
        checkpoint_dir=checkpoint_dir,
        strict_manifest=strict,
        resume=resume,
        log_format=log_format,
        log_level=log_level,
        dry_run=dry_run,
        state_dir=state_dir,
        local_epochs=local_epochs,
        local_steps=local_steps,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        seed=seed,
        final_model=final_model,
        torch_threads=torch_threads,
        min_peers=min_peers,
        min_peers_timeout=min_peers_timeout,
        **network,
        log_file=log_file,
        log_max_bytes=log_max_bytes,
        log_backups=log_backups,
        ops=OpsSettings(metrics_port=metrics_port, metrics_listen=metrics_listen, metrics_file=metrics_file),
        trace=trace,
    )
    from quinkgl_cli.node.daemon import run_daemon  # torch: after the cheap checks above

    code = run_daemon(options)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
