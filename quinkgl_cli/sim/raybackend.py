"""`quinkgl simulate --backend ray`: the sharded schedule (`quinkgl_cli.sim.sharded`) with each shard a Ray actor.

Ray places the actors (one CPU each, or a share of one when asked for more actors than the cluster has CPUs),
starts and connects the processes, and moves the shards' batches from actor to actor through its object store
(the driver passes references on and never reads them). Nothing here opens a socket of its own.

Where Ray runs: without ``--ray-address`` a private single-machine Ray instance is started for the run and stopped
after it, every service bound to 127.0.0.1 (no dashboard, no usage statistics); with ``--ray-address HOST:PORT``
the run joins that cluster (its GCS address, as ``ray start --head`` prints it) and leaves it running. A non-
loopback address must be allowed explicitly (``--ray-allow-remote``): a Ray cluster trusts its members, so it
belongs on a network where every machine is yours. Every node needs quinkgl, the peer script and its data at the
same paths.

Ray is optional (``pip install 'quinkgl-cli[ray]'``): nothing else imports this module, and it imports Ray only
when a run starts. Owns connecting, the actors and their teardown.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from quinkgl_cli.errors import NetworkError, UsageError
from quinkgl_cli.sim.peerwarnings import worker_logging
from quinkgl_cli.sim.results import RoundSummary, SimResult
from quinkgl_cli.sim.sharded import ShardedRun, check_mode, worker_args
from quinkgl_cli.sim.shardworker import ShardWorker
from quinkgl_cli.sim.simulator import Simulator
from quinkgl_cli.validation import is_loopback

INSTALL_HINT = "install it: pip install 'quinkgl-cli[ray]' (in a checkout: pip install -c constraints.txt -e '.[ray]')"


def import_ray(loopback: bool) -> ModuleType:
    """Ray, set up before its first import: no usage statistics; ``loopback``: this process is a node at 127.0.0.1
    (Ray otherwise advertises, and binds, the machine's outward address)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if loopback:
        # Ray reads it once, at import: on Linux it then resolves 127.0.0.1 to the machine's outward address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--backend ray needs Ray, which is not installed", INSTALL_HINT) from exc
    return ray


def connect(ray: ModuleType, address: str | None) -> bool:
    """Join Ray: the cluster at ``address``, or a private one started here (True: the caller must stop it). A Ray
    this process already joined is reused."""
    if ray.is_initialized():
        return False
    if address is None:
        # "local": always a new instance, never one a `ray start` left a pointer to in the temp directory
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        outward = sorted({n["NodeManagerAddress"] for n in ray.nodes()} - {"127.0.0.1"})
        if outward:  # Ray was imported before `import_ray` could keep it on loopback
            ray.shutdown()
            raise UsageError(f"the private Ray instance came up on {', '.join(outward)}, not 127.0.0.1",
                             "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is first imported")
        return True
    try:
        ray.init(address=address, configure_logging=False)
    except ConnectionError as exc:
        raise NetworkError(f"cannot join the Ray cluster at {address}: {exc}",
                           "check the address; a cluster with token authentication (ray start's default) also needs "
                           "RAY_AUTH_MODE=token and its token (~/.ray/auth_token or RAY_AUTH_TOKEN)") from exc
    return False


class RayExecutor:
    def __init__(self, ray: ModuleType, actors: Sequence[Any]) -> None:
        self.ray = ray
        self.actors = list(actors)
        self.shards = len(self.actors)

    def submit(self, shard: int, method: str, args: Sequence[Any], returns: int) -> list[Any]:
        ref = getattr(self.actors[shard], method).options(num_returns=returns).remote(*args)
        return list(ref) if returns > 1 else [ref]

    def get(self, handles: list[Any]) -> list[Any]:
        return list(self.ray.get(handles))

    def held_warnings(self) -> list[dict[str, Any]]:
        parts = self.ray.get([actor.held_warnings.remote() for actor in self.actors])
        return [w for part in parts for w in json.loads(part)]


class RayShard(ShardWorker):
    """A shard worker as a Ray actor (one per worker process), logging as a worker process does."""

    def __init__(self, log_level: int, *args: Any) -> None:
        self._held = worker_logging(log_level)
        super().__init__(*args)

    def held_warnings(self) -> str:
        return json.dumps(self._held.export())


def shard_count(peers: int, cpus: int, peers_per_actor: int | None) -> int:
    if peers_per_actor is not None:
        return math.ceil(peers / peers_per_actor)
    return max(1, min(peers, cpus))


class RaySimulation:
    """`Simulator`'s ``progress`` and ``run()``, on Ray. ``address``: a cluster's HOST:PORT, or None for a private one."""

    def __init__(self, sim: Simulator, address: str | None = None, peers_per_actor: int | None = None,
                 progress: Callable[[RoundSummary], None] | None = None) -> None:
        check_mode(sim, "ray")
        if peers_per_actor is not None and peers_per_actor < 1:
            raise UsageError(f"--peers-per-actor {peers_per_actor} must be at least 1", "use --peers-per-actor 1 or more")
        self.ray = import_ray(address is None or is_loopback(address.rpartition(":")[0]))
        self.sim = sim
        self.address = address
        self.peers_per_actor = peers_per_actor
        self.progress = progress
        self.shards = 0

    def run(self) -> SimResult:
        ray = self.ray
        started = connect(ray, self.address)
        actors: list[Any] = []
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.shards = shard_count(self.sim.config.peers, cpus, self.peers_per_actor)
            # More actors than CPUs share them: whole CPUs each would leave the surplus waiting forever.
            worker = ray.remote(num_cpus=min(1.0, cpus / self.shards))(RayShard)
            level = logging.getLogger("quinkgl").getEffectiveLevel()
            actors = [worker.remote(level, *worker_args(self.sim, i, self.shards)) for i in range(self.shards)]
            return ShardedRun(self.sim, RayExecutor(ray, actors), "ray", self.progress).run()
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()
