"""`quinkgl doctor`'s run: this node's transport started briefly, as `quinkgl run` would start it, to see how its
peers reach it. No model is built and nothing is trained.

In order: the manifest trusted under the policy and this node's admission (as `node.startup`), the node's state
directory held (a running daemon of the same node id is refused: stop it first, the doctor checks the ports it
would use), then the IPv8 transport started with the node's own key and flags. Every peer met is probed once
(`IPv8Transport.probe_tcp`: does it reach our TCP port when asked, do we reach its); the run ends when every peer
met is probed, has told us where it sees our datagrams, and no new peer came for ``SETTLE`` seconds, or at the
timeout. `node.diagnosis` turns what was seen into the verdict and advice.

Owns the options of a doctor run and the sink that stands in for a node.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.node.diagnosis import Diagnosis, Observed, PeerObserved, assess
from quinkgl_cli.node.options import NetworkOptions, TrustOptions
from quinkgl_cli.transport.base import ControlValue, ModelReceived, PeerInfo

SETTLE = 2.0  # seconds without a new peer before the picture is taken as complete
POLL = 0.1


@dataclass(frozen=True)
class DoctorOptions:
    manifest: Path
    node_id: str
    trust: TrustOptions = field(default_factory=TrustOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    state_dir: Path | None = None
    timeout: float = 15.0


class _Sink:
    """The transport's event sink: a doctor has no node; peers are read from the transport's table, and a model a
    peer offers meanwhile is fetched (its path is then known) and dropped."""

    def on_peer_discovered(self, peer: PeerInfo) -> None:
        return None

    def on_peer_lost(self, peer: PeerInfo) -> None:
        return None

    def on_model(self, update: ModelReceived) -> None:
        return None

    def on_message(self, sender: str, kind: str, body: dict[str, ControlValue]) -> None:
        return None


def diagnose(options: DoctorOptions) -> Diagnosis:
    """Start the transport, watch and probe until complete or ``timeout``, stop; raises QuinkglError at start-up."""
    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.node.admission import prepare_admission
    from quinkgl_cli.node.dirlock import lock_directory
    from quinkgl_cli.node.startup import node_state_path

    trust = options.trust
    trusted = load_trusted(options.manifest, trust.trust_policy, tuple(trust.trusted_pubkeys), options.state_dir)
    state = node_state_path(options.state_dir, options.node_id)
    admission = prepare_admission(trusted, options.node_id, state, trust.certificate, trust.revocations)
    held = lock_directory(state, "node state directory",
                          f"a daemon runs as --node-id {options.node_id}: stop it first (doctor checks the ports it would use)")
    try:
        transport = _transport(options, trusted, state, admission)
        return asyncio.run(_observe(options, transport, trusted.swarm_id))
    finally:
        held.release()


def _transport(options: DoctorOptions, trusted: Any, state: Path, admission: Any) -> Any:
    from quinkgl_cli.paths import state_home
    from quinkgl_cli.transport.ipv8 import IPv8Transport
    from quinkgl_cli.transport.rendezvous import Rendezvous

    net = options.network
    bootstrap = list(dict.fromkeys([*net.bootstrap_peers, *trusted.manifest.bootstrap_peers]))
    rendezvous = Rendezvous(state_home(options.state_dir), trusted.swarm_id, options.node_id) if net.rendezvous else None
    return IPv8Transport(node_id=options.node_id, swarm_id=trusted.swarm_id, arch_hash=trusted.manifest.model.arch_hash,
                         state_dir=state, listen_host=net.listen, port=net.port, bootstrap=bootstrap, rendezvous=rendezvous,
                         admission=admission, **net.transport_options)


async def _observe(options: DoctorOptions, transport: Any, swarm_id: str) -> Diagnosis:
    started = time.monotonic()
    await transport.start(_Sink())
    probes: dict[str, asyncio.Task[Any]] = {}
    try:
        last_new = started
        deadline = started + options.timeout
        while True:
            now = time.monotonic()
            for peer in transport.peers():
                if peer.node_id not in probes:
                    probes[peer.node_id] = asyncio.ensure_future(transport.probe_tcp(peer.node_id))
                    last_new = now
            if now >= deadline or (probes and now - last_new >= SETTLE and _complete(transport, probes)):
                break
            await asyncio.sleep(POLL)
        return assess(_observed(options, transport, swarm_id, probes, time.monotonic() - started))
    finally:
        for task in probes.values():
            task.cancel()
        await asyncio.gather(*probes.values(), return_exceptions=True)
        await transport.stop()


def _complete(transport: Any, probes: dict[str, asyncio.Task[Any]]) -> bool:
    current = {p.node_id for p in transport.peers()}
    for node_id in current:
        view = transport.peer_view(node_id)
        # A peer met through a relay never sees our datagrams: it cannot say where they come from.
        if not probes[node_id].done() or view is None or view["seen_as"] is None and view.get("via") is None:
            return False
    return True


def _observed(options: DoctorOptions, transport: Any, swarm_id: str, probes: dict[str, asyncio.Task[Any]],
              elapsed: float) -> Observed:
    from quinkgl_cli.validation import is_loopback

    peers = []
    for info in transport.peers():
        view = transport.peer_view(info.node_id)
        if view is None:
            continue
        task = probes.get(info.node_id)
        result = task.result() if task is not None and task.done() and not task.cancelled() and task.exception() is None else None
        tcp_in, tcp_out = result if result is not None else (None, "not_probed")
        peers.append(PeerObserved(info.node_id, view["address"], view["seen_as"], tcp_in, tcp_out, view["relay"], view["routes"]))
    reach = transport.reachability()
    host, port = transport.address
    return Observed(options.node_id, swarm_id, options.network.listen, f"{host}:{port}", transport.tcp_port,
                    is_loopback(options.network.listen), str(reach.get("nat", "unknown")), list(reach.get("seen_as", [])),
                    sorted(peers, key=lambda p: p.node_id), options.timeout, elapsed)
