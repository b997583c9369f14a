"""`quinkgl doctor`: can this node's peers reach it, and how will models travel? (the work is in `node.doctor`)

Exit codes: 0 reachable (peers reach its UDP port at the address they see, without a symmetric NAT in the way,
and its TCP port), 8 not reachable (peers were met but cannot reach a port: models then need reverse or relayed
transfers, or have no way at all), 9 no peer met within ``--timeout``; start-up errors as `quinkgl run`'s.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quinkgl_cli import validation
from quinkgl_cli.cli import netflags as nf
from quinkgl_cli.cli.stopsignals import stop_as_interrupt
from quinkgl_cli.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from quinkgl_cli.node.diagnosis import Diagnosis

_EXIT = {"reachable": ExitCode.OK, "not_reachable": ExitCode.NOT_REACHABLE, "no_peers": ExitCode.NO_PEERS}


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def render(d: Diagnosis) -> str:
    lines = [f"doctor node={d.node_id} swarm={d.swarm_id} listen={d.listen} udp={d.udp} tcp_port={d.tcp_port}"]
    seen = ", ".join(d.seen_as) or "-"
    lines.append(f"udp        {d.udp_state}   (nat={d.nat}; peers see this node at {seen})")
    lines.append(f"tcp        {d.tcp_state}   ({sum(1 for p in d.peers if p.tcp_in)} of {len(d.peers)} peers reached port {d.tcp_port})")
    lines.append(f"relays     {', '.join(d.relays) or '-'}")
    lines.append(f"peers      {len(d.peers)} met in {d.elapsed:g}s")
    width = max([len(p.node_id) for p in d.peers] + [4])
    for p in d.peers:
        lines.append(f"  {p.node_id:<{width}}  {p.address:<21}  receive={p.receive:<12} send={p.send:<12} "
                     f"reaches_us={_yes(p.tcp_in)} we_reach={p.tcp_out} tries={','.join(p.tries) or '-'}")
    lines.append(f"verdict    {d.verdict} (exit {int(_EXIT[d.verdict])})")
    lines += [f"problem    {line}" for line in d.problems]
    lines += [f"note       {line}" for line in d.notes]
    return "\n".join(lines)


def _apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    # The node's own `run --config` file, so the doctor checks the ports and flags the daemon will use: keys are
    # checked against run's flags, and the ones only run has (script, rounds, ...) are not the doctor's business.
    if value is not None:
        from quinkgl_cli.cli.config_file import config_defaults
        from quinkgl_cli.cli.run import config_flags

        own = {param.name for param in ctx.command.params}
        defaults = config_defaults(value, config_flags())
        ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in defaults.items() if k in own}}
    return value


def doctor(
    ctx: typer.Context,
    manifest: nf.Manifest,
    node_id: nf.NodeId = None,
    port: nf.Port = 0,
    listen: nf.Listen = "127.0.0.1",
    bootstrap_peer: nf.BootstrapPeer = None,
    trust_policy: nf.TrustPolicy = None,
    trusted_pubkey: nf.TrustedPubkey = None,
    certificate: nf.Certificate = None,
    revocations: nf.Revocations = None,
    state_dir: nf.StateDir = None,
    public_bootstrap: nf.PublicBootstrap = False,
    lan_discovery: nf.LanDiscovery = False,
    relay: nf.Relay = False,
    relay_rate: nf.RelayRate = 50.0,
    rendezvous: nf.Rendezvous = True,
    config: Annotated[
        Path | None,
        typer.Option("--config", metavar="FILE", is_eager=True, callback=_apply_config,
                     help="The node's `quinkgl run --config` file: its network and trust keys apply; flags given here win."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", help="Give up waiting for peers (and their answers) after this long.")
    ] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of the text report.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="Transport log lines on stderr: debug | info | warning | error.")] = "warning",
) -> None:
    """Start this node's transport briefly (no training) with `run`'s flags and report how its peers reach it:
    UDP and TCP reachability, the NAT type observed, the way models would travel to and from each peer met, and
    what to change. Exit 0 reachable, 8 not reachable, 9 no peer met."""
    import json

    from quinkgl_cli.node.doctor import DoctorOptions, diagnose
    from quinkgl_cli.node.logs import setup_logging
    from quinkgl_cli.node.options import NetworkOptions, TrustOptions, default_node_id

    stop_as_interrupt(ctx)  # SIGTERM, SIGHUP: `interrupted`, exit 130, as Ctrl-C
    nid = validation.node_id(node_id if node_id is not None else default_node_id())
    network = nf.network_options(listen=listen, port=port, bootstrap_peer=bootstrap_peer, public_bootstrap=public_bootstrap,
                                 lan_discovery=lan_discovery, relay=relay, relay_rate=relay_rate, rendezvous=rendezvous)
    if not 0 < timeout <= 3600:
        raise UsageError(f"--timeout {timeout} must be between 0 and 3600 seconds")
    level = getattr(logging, log_level.upper(), None)
    if log_level.lower() not in ("debug", "info", "warning", "error") or not isinstance(level, int):
        raise UsageError(f"--log-level {log_level!r} is not one of debug, info, warning, error")
    keys = list(trusted_pubkey or [])
    trust = TrustOptions(trust_policy=trust_policy if trust_policy is not None else ("pinned" if keys else "tofu"),
                         trusted_pubkeys=keys, certificate=certificate, revocations=revocations)
    setup_logging(nid, "text", level, stream=sys.stderr)
    diagnosis = diagnose(DoctorOptions(manifest, nid, trust, NetworkOptions(**network), state_dir, timeout))
    typer.echo(json.dumps(diagnosis.as_dict(), sort_keys=True) if as_json else render(diagnosis))
    code = _EXIT[diagnosis.verdict]
    if code:
        raise typer.Exit(int(code))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
