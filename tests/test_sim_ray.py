"""`simulate --backend ray` on a real Ray instance, started once for the module on 127.0.0.1 and stopped after it:
the local backend's results for a seed, through actors; and every socket Ray listens on is on loopback.

Skipped where Ray is not installed (it is an optional extra: pip install 'quinkgl-cli[ray]'); the schedule itself
is tested without Ray in test_sim_sharded.py."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from quinkgl_cli.sim.config import SimConfig
from quinkgl_cli.sim.raybackend import RaySimulation, connect, import_ray
from quinkgl_cli.sim.simulator import Simulator
from tests.helpers_manifest import write
from tests.helpers_sharded import SCRIPT, differences, digits

# Not importorskip: Ray must first be imported by the backend, which keeps it on loopback.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="Ray is an optional extra (pip install 'quinkgl-cli[ray]'); not installed here"),
    pytest.mark.xdist_group("ray"),  # one Ray instance at a time on 2 cores
]


@pytest.fixture(scope="module")
def ray() -> Iterator[ModuleType]:
    ray = import_ray(loopback=True)
    started = connect(ray, None)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@pytest.mark.parametrize("config", [
    SimConfig(peers=8, rounds=3, partition="shards:2", seed=7),
    SimConfig(peers=8, rounds=2, partition="shards:2", seed=7, mode="fedavg", clients_per_round=4),
    SimConfig(peers=8, rounds=2, partition="shards:2", seed=7, mode="pairwise", pairs_per_round=5),
], ids=["gossip", "fedavg", "pairwise"])
def test_the_ray_backend_gives_the_local_backends_curve(ray: ModuleType, config: SimConfig) -> None:
    script, manifest = digits()
    local = Simulator(script, manifest, config).run()
    run = RaySimulation(Simulator(script, manifest, config), peers_per_actor=3)
    on_ray = run.run()
    assert run.shards == 3
    assert on_ray.memory["shards"] == 3
    assert differences(local, on_ray) == []
    assert [r.mean_accuracy for r in on_ray.rounds] == [r.mean_accuracy for r in local.rounds]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc to find the listening sockets")
def test_ray_listens_on_loopback_only(ray: ModuleType) -> None:
    ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
    inodes = _socket_inodes(_descendants(os.getpid()))
    listening = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if inode in inodes and (state == "0A" or table.startswith("udp")):
                    listening.append((table, local))
    assert listening, "found none of Ray's listening sockets: the check would pass vacuously"
    assert [(t, a) for t, a in listening if a.split(":")[0] not in LOOPBACK_HEX] == []


def test_the_cli_runs_on_ray(ray: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quinkgl_cli.cli.app import main

    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "4", "--rounds", "1",
              "--backend", "ray", "--peers-per-actor", "2"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None)
    assert "final mean_accuracy=" in out and "round=001" in out


def test_a_warning_every_actors_peers_give_is_said_once(ray: ModuleType, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Each actor printed its own peers' `input-shape-mismatch` lines (through Ray's log forwarding, one per peer);
    the driver now says it once for the swarm with the number of peers, as the local backend does."""
    from quinkgl_cli.cli.app import main
    from tests.test_batches import SEQUENCES, _manifest

    script = tmp_path / "gru.py"
    script.write_text(SEQUENCES.replace("LENGTH", "30"))
    manifest = _manifest(tmp_path, script, input_shape="20,4")
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--manifest", str(manifest), "--script", str(script), "--peers", "4", "--rounds", "1",
              "--partition", "iid", "--backend", "ray", "--peers-per-actor", "2"])
    err = capfd.readouterr().err
    assert done.value.code in (0, None), err
    assert "WARNING - input-shape-mismatch manifest=[20,4] batch=[30,4] loaders=[train] peers=4" in err.splitlines()
