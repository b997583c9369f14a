"""`quinkgl simulate`: a whole swarm of real nodes in one process, in virtual time, to choose a manifest."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from quinkgl_cli.cli.output import check_output_file, parse_kv
from quinkgl_cli.cli.stopsignals import stop_as_interrupt
from quinkgl_cli.errors import UsageError

_KV = "K=V"
_MODES = ("gossip", "fedavg", "pairwise", "local")
_BACKENDS = ("local", "processes", "ray")
_F_RULES = ("Krum", "MultiKrum", "TrimmedMean")  # robust rules that discard exactly f updates
DEFAULT_CLIENTS_PER_ROUND = 10
_DIST = "X | uniform:LO:HI | lognormal:MEDIAN:SIGMA | straggler:BASE:P:FACTOR"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _line(summary: Any) -> str:
    tag = f"round={summary.round:03d}" if summary.phase == "train" else f"consensus after_round={summary.round:03d}"
    return (
        f"{tag} mean_accuracy={_fmt(summary.mean_accuracy)} min_accuracy={_fmt(summary.min_accuracy)} "
        f"max_accuracy={_fmt(summary.max_accuracy)} own_accuracy={_fmt(summary.mean_own_accuracy)} "
        f"val_loss={_fmt(summary.mean_val_loss, 4)} model_sends={summary.model_sends} bytes_sent={summary.bytes_sent} "
        f"seconds={summary.seconds:.2f}"
    )


def simulate(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Option("--manifest", help="Swarm manifest (.qgl) to simulate.", metavar="FILE")],
    script: Annotated[Path, typer.Option("--script", help="Peer script (build_model, build_loaders, ...).", metavar="FILE")],
    peers: Annotated[int, typer.Option("--peers", metavar="N", help="Number of simulated peers.")] = 20,
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", help="Training rounds.")] = 20,
    partition: Annotated[
        str, typer.Option("--partition", metavar="SCHEME", help="How the training set is split: iid | shards:K (K label shards per peer) | classes:K (K consecutive classes per peer) | dirichlet:ALPHA | script (each peer gets the script's own build_loaders(shard=i, num_shards=N)).")
    ] = "iid",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the split, initialisations and choices.")] = 0,
    mode: Annotated[str, typer.Option("--mode", metavar="MODE", help="gossip (the manifest) | fedavg (central server baseline) | pairwise (the DP tutorial's pair averaging over the topology's edges) | local (no sharing).")] = "gossip",
    attackers: Annotated[
        str | None, typer.Option("--attackers", metavar="N:KIND", help="N Byzantine peers sharing corrupted models: signflip | gaussian | scale | alie | ipm | labelflip; or silent (sending nothing: a baseline).")
    ] = None,
    dp_epsilon: Annotated[float | None, typer.Option("--dp-epsilon", metavar="X", help="Override the manifest's local DP epsilon.")] = None,
    aggregation: Annotated[str | None, typer.Option("--aggregation", metavar="NAME", help="Override the aggregation strategy.")] = None,
    aggregation_param: Annotated[list[str] | None, typer.Option("--aggregation-param", metavar=_KV, help="Aggregation parameter (repeatable).")] = None,
    topology: Annotated[str | None, typer.Option("--topology", metavar="NAME", help="Override the topology.")] = None,
    topology_param: Annotated[list[str] | None, typer.Option("--topology-param", metavar=_KV, help="Topology parameter (repeatable).")] = None,
    fanout: Annotated[int | None, typer.Option("--fanout", metavar="K", help="Override the topology's fanout.")] = None,
    training_param: Annotated[
        list[str] | None, typer.Option("--training-param", metavar=_KV, help="local_epochs, gossip_steps, final_consensus_steps, ... (repeatable).")
    ] = None,
    compression_param: Annotated[
        list[str] | None, typer.Option("--compression-param", metavar=_KV, help="top_k_ratio, quantize_bits, error_feedback, ... (repeatable).")
    ] = None,
    byzantine_f: Annotated[int | None, typer.Option("--byzantine-f", metavar="N", help="Override the manifest's byzantine_f.")] = None,
    personalization: Annotated[str | None, typer.Option("--personalization", metavar="MODE", help="Override the manifest's personalization: none | apfl | fedrep.")] = None,
    personalization_param: Annotated[
        list[str] | None, typer.Option("--personalization-param", metavar=_KV, help="apfl: alpha, alpha_lr; fedrep: head_prefixes, head_epochs (repeatable).")
    ] = None,
    clients_per_round: Annotated[
        int | None, typer.Option("--clients-per-round", metavar="N", help="fedavg mode: clients sampled per round (default: 10, at most --peers).")
    ] = None,
    pairs_per_round: Annotated[int, typer.Option("--pairs-per-round", metavar="N", help="pairwise mode: edges averaged per round.")] = 10,
    max_peers: Annotated[
        int | None, typer.Option("--max-peers", metavar="N", help="Peers a node may know (default: the daemon's IPv8 peer-table bound, 256).")
    ] = None,
    script_arg: Annotated[list[str] | None, typer.Option("--script-arg", metavar=_KV, help="k=v passed to the script's hooks (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write every metric as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE", help="Draw the accuracy curves (PNG).")] = None,
    trust_policy: Annotated[str, typer.Option("--trust-policy", metavar="POLICY", help="open | tofu | pinned (simulation default: open).")] = "open",
    trusted_pubkey: Annotated[list[str] | None, typer.Option("--trusted-pubkey", metavar="KEY", help="Creator key for pinned (repeatable).")] = None,
    threads: Annotated[int, typer.Option("--threads", metavar="N", help="torch threads (peers run in turn; 1 suits small models).")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show every node's log lines (warnings are always shown).")] = False,
    latency: Annotated[str | None, typer.Option("--latency", metavar="DIST", help=f"Field: seconds each message takes, drawn per message: {_DIST}.")] = None,
    bandwidth: Annotated[str | None, typer.Option("--bandwidth", metavar="DIST", help=f"Field: bytes/s of each peer's link, drawn per peer (a transfer takes size / the slower end's): {_DIST}.")] = None,
    drop: Annotated[float | None, typer.Option("--drop", metavar="P", help="Field: probability that a message is lost (0..1).")] = None,
    churn: Annotated[float | None, typer.Option("--churn", metavar="SHARE", help="Field: share of online peers leaving at each round interval (0..<1); they come back later.")] = None,
    churn_away: Annotated[float | None, typer.Option("--churn-away", metavar="ROUNDS", help="Field: rounds a leaving peer stays away, on average (default 2).")] = None,
    churn_fresh: Annotated[float | None, typer.Option("--churn-fresh", metavar="SHARE", help="Field: share of returning peers that lost their checkpoint (start at round 0; default 0).")] = None,
    late_join: Annotated[float | None, typer.Option("--late-join", metavar="SHARE", help="Field: share of peers first joining mid-run, from scratch (0..<1).")] = None,
    speed: Annotated[str | None, typer.Option("--speed", metavar="DIST", help=f"Field: virtual seconds one round's training takes, drawn per peer (default 1): {_DIST}.")] = None,
    gossip_interval: Annotated[float | None, typer.Option("--gossip-interval", metavar="SECONDS", help="Field: virtual seconds between round starts, as the daemon's flag (default 10).")] = None,
    trace: Annotated[Path | None, typer.Option("--trace", metavar="FILE", help="Field: replay a trace of real daemons (quinkgl run --trace; concatenated files): training times, transfers, arrivals and departures; --peers = its node count.")] = None,
    backend: Annotated[str, typer.Option("--backend", metavar="NAME", help="local (one process) | processes (peers in --workers processes on this machine) | ray (peers on Ray actors; pip install 'quinkgl-cli[ray]'). Same results for a seed.")] = "local",
    workers: Annotated[
        int | None, typer.Option("--workers", metavar="N", help="--backend processes: worker processes (default: one per available CPU).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", metavar="HOST:PORT", help="--backend ray: join this Ray cluster (its GCS address) instead of starting a private one on 127.0.0.1.")
    ] = None,
    ray_allow_remote: Annotated[bool, typer.Option("--ray-allow-remote", help="Allow a --ray-address off loopback (a Ray cluster trusts its members: only on your own network).")] = False,
    peers_per_actor: Annotated[
        int | None, typer.Option("--peers-per-actor", metavar="N", help="--backend ray: peers per actor (default: as many actors as the cluster has CPUs).")
    ] = None,
) -> None:
    """Run a whole swarm of real nodes in virtual time (no waiting), deterministic for --seed: in this process, or
    spread over worker processes (--backend processes) or Ray actors (--backend ray) with the same results."""
    stop_as_interrupt(ctx)  # SIGTERM, SIGHUP: `interrupted`, exit 130, as Ctrl-C
    import logging

    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.node.script import check_script_file, load_script
    from quinkgl_cli.node.startup import refuse_untrainable
    from quinkgl_cli.sim.attacks import parse_attackers
    from quinkgl_cli.sim.fieldconf import field_config
    from quinkgl_cli.sim.peerwarnings import PeerWarnings, stderr_handler
    from quinkgl_cli.sim.procbackend import available_cpus
    from quinkgl_cli.sim.report import communication, plot_result, write_json
    from quinkgl_cli.sim.simulator import Overrides, SimConfig, make_simulator
    from quinkgl_cli.transport.memory import DEFAULT_MAX_PEERS

    if mode not in _MODES:
        raise UsageError(f"--mode {mode!r} is not one of {', '.join(_MODES)}", "use --mode gossip, fedavg, pairwise or local")
    if threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1", "use --threads 1")
    address = _backend_flags(backend, ray_address, ray_allow_remote, peers_per_actor, workers)
    count, kind = parse_attackers(attackers)
    conditions = field_config(latency, bandwidth, drop, churn, churn_away, churn_fresh, late_join, speed, gossip_interval,
                              trace)
    for path, flag in ((json_out, "--json"), (plot, "--plot")):
        check_output_file(path, flag)
    per_round = clients_per_round if clients_per_round is not None else min(DEFAULT_CLIENTS_PER_ROUND, peers)
    script = check_script_file(script)  # before trust, which may remember the creator's key

    trusted = load_trusted(manifest, trust_policy, tuple(trusted_pubkey or ()))
    refuse_untrainable(trusted.manifest, manifest)
    peer_script = load_script(script)
    config = SimConfig(
        peers=peers, rounds=rounds, partition=partition, seed=seed, mode=mode,  # type: ignore[arg-type]
        attackers=count, attack=kind, clients_per_round=per_round, pairs_per_round=pairs_per_round,
        max_peers=DEFAULT_MAX_PEERS if max_peers is None else max_peers, threads=threads,
        script_args=parse_kv(script_arg, "--script-arg"),
        overrides=Overrides(
            aggregation=aggregation, aggregation_params=parse_kv(aggregation_param, "--aggregation-param"),
            topology=topology, topology_params=parse_kv(topology_param, "--topology-param"), fanout=fanout,
            training_params=parse_kv(training_param, "--training-param"),
            compression_params=parse_kv(compression_param, "--compression-param"),
            dp_epsilon=dp_epsilon, byzantine_f=byzantine_f, personalization=personalization,
            personalization_params=parse_kv(personalization_param, "--personalization-param"),
        ),
        conditions=conditions,
    )

    node_log = logging.getLogger("quinkgl")
    handler = stderr_handler()
    once = PeerWarnings()
    handler.addFilter(once)
    node_log.addHandler(handler)
    # Restored afterwards: the simulator may run inside a process (tests, a notebook) whose logging we must not keep.
    level, propagate = node_log.level, node_log.propagate
    node_log.setLevel(logging.INFO if verbose else logging.WARNING)
    node_log.propagate = False
    try:
        sim = make_simulator(peer_script, trusted.manifest, config)
        weak = _undefended(sim.manifest, count)
        if weak:
            typer.echo(f"warning: {weak}", err=True)
        if sim.rounds < rounds:
            typer.echo(f"note: the manifest's round_limit caps --rounds {rounds} to {sim.rounds}", err=True)
        hint = one_core_hint(peers, backend, conditions is not None, available_cpus())
        if hint is not None:
            typer.echo(f"note: {hint}", err=True)
        if backend == "ray":
            from quinkgl_cli.sim.raybackend import RaySimulation

            result = _run(RaySimulation(sim, address, peers_per_actor), sim.rounds)
        elif backend == "processes":
            from quinkgl_cli.sim.procbackend import ProcessSimulation

            result = _run(ProcessSimulation(sim, workers), sim.rounds)
        else:
            result = _run(sim, sim.rounds)
    finally:
        handler.removeFilter(once)
        once.say()
        node_log.removeHandler(handler)
        node_log.setLevel(level)
        node_log.propagate = propagate

    final = result.final
    comm = communication(result)
    m = result.manifest
    steps = result.consensus_steps
    source = f"after {steps} consensus step{'s' if steps != 1 else ''}" if result.consensus else "after the last round"
    typer.echo(f"final mean_accuracy={_fmt(final.mean_accuracy)} min_accuracy={_fmt(final.min_accuracy)} "
               f"max_accuracy={_fmt(final.max_accuracy)} own_accuracy={_fmt(final.mean_own_accuracy)} "
               f"min_own_accuracy={_fmt(final.min_own_accuracy)} val_loss={_fmt(final.mean_val_loss, 4)} ({source})")
    if config.mode == "gossip":
        typer.echo(f"setup aggregation={m.aggregation.name} topology={m.topology.name} "
                   f"fanout={_fanout(m)} local_epochs={m.training.local_epochs} "
                   f"gossip_steps={m.training.gossip_steps} final_consensus_steps={m.training.final_consensus_steps}"
                   + (f" attackers={','.join(result.attackers)}:{config.attack}" if result.attackers else ""))
    typer.echo(f"communication model_sends={comm['model_sends_total']} bytes_sent={comm['bytes_sent_total']} "
               f"sends_per_peer_per_round={comm['sends_per_peer_per_round']:.2f} "
               f"consensus_sends_per_peer={comm['consensus_sends_per_peer']:.2f}")
    mem = result.memory
    typer.echo(f"resources build_s={result.timing['build_s']:.2f} run_s={result.timing['run_s']:.2f} "
               f"per_peer_kb={mem['per_peer_kb']:.1f} rss_end_mb={mem['rss_end_mb']:.1f} "
               f"known_peers_mean={mem['known_peers_mean']:.1f} max_peers={mem['max_peers']:.0f}")
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")
    if plot is not None:
        plot_result(result, plot)
        typer.echo(f"wrote {plot}")


# From this many peers up a local run takes minutes (1,000 x 20 rounds: about 2 on this project's machine).
LARGE_SWARM = 1000


def one_core_hint(peers: int, backend: str, field: bool, cpus: int) -> str | None:
    """What to say when a large swarm runs in one process on a machine with more cores (None: nothing): the processes
    backend gives the same results on all of them, field conditions aside (it does not simulate them)."""
    if backend != "local" or field or peers < LARGE_SWARM or cpus < 2:
        return None
    return f"{peers} peers in one process use 1 of {cpus} CPUs: --backend processes runs them on all, with the same results"


def _backend_flags(backend: str, ray_address: str | None, allow_remote: bool, peers_per_actor: int | None,
                   workers: int | None) -> str | None:
    """The Ray cluster's address to join (None: start a private one), after checking the backend's flags."""
    from quinkgl_cli import validation

    if backend not in _BACKENDS:
        raise UsageError(f"--backend {backend!r} is not one of {', '.join(_BACKENDS)}",
                         "use --backend local, processes or ray")
    if workers is not None and backend != "processes":
        raise UsageError("--workers needs --backend processes", "add --backend processes")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1", "use --workers 1 or more")
    if backend != "ray" and (ray_address is not None or peers_per_actor is not None or allow_remote):
        raise UsageError("--ray-address, --ray-allow-remote and --peers-per-actor need --backend ray", "add --backend ray")
    if peers_per_actor is not None and peers_per_actor < 1:
        raise UsageError(f"--peers-per-actor {peers_per_actor} must be at least 1", "use --peers-per-actor 1 or more")
    if ray_address is None:
        return None
    host, port = validation.peer_address(ray_address, "--ray-address")
    if not validation.is_loopback(host) and not allow_remote:
        raise UsageError(f"--ray-address {ray_address} is not on loopback",
                         "add --ray-allow-remote to join a Ray cluster on another machine (your own network only)")
    return f"{host}:{port}"


def _undefended(manifest: Any, attackers: int) -> str | None:
    """Why a robust aggregation will not stop ``attackers`` Byzantine peers, or None.

    Krum, MultiKrum and TrimmedMean discard as many updates as the number f they are told to tolerate (their
    ``f`` parameter, else the manifest's byzantine_f): with f below the attackers, the surplus are averaged in.
    """
    name = manifest.aggregation.name
    params = manifest.aggregation.params
    if attackers == 0 or name not in _F_RULES or params.get("trim_ratio"):
        return None
    f = params.get("f")
    f = manifest.byzantine_f if f is None else f
    if f >= attackers:
        return None
    return (f"{name} tolerates f={f} Byzantine peers, but {attackers} attack: the rest are averaged in"
            f" (pass --byzantine-f {attackers}, or create the manifest with --byzantine-f)")


def _fanout(manifest: Any) -> str:
    from quinkgl_cli.strategies import registry

    entry = registry.resolve("topology", manifest.topology.name)
    params = registry.build_params(entry, dict(manifest.topology.params))
    return str(getattr(params, "fanout", "-"))


def _run(sim: Any, rounds: int) -> Any:
    """Run with a progress bar on a terminal, one plain line per round when piped."""
    if not sys.stdout.isatty():
        sim.progress = lambda s: typer.echo(_line(s))
        return sim.run()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    with Progress(
        TextColumn("[bold]simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[acc]}"), console=console, transient=False,
    ) as bar:
        task = bar.add_task("rounds", total=rounds, acc="")

        def progress(summary: Any) -> None:
            console.print(_line(summary), highlight=False)
            if summary.phase == "train":
                bar.update(task, advance=1, acc=f"mean acc {_fmt(summary.mean_accuracy)}")

        sim.progress = progress
        return sim.run()


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
