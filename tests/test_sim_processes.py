"""`simulate --backend processes`: the sharded schedule with each shard a worker process on this machine. The same
results as the local simulator for a seed; a worker's error comes back as the same one-line error; a worker that
dies fails the run instead of hanging it; the pipe framing; the flags."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.sim.config import SimConfig
from quinkgl_cli.sim.procbackend import ProcessSimulation, recv_values, send_values, worker_count
from quinkgl_cli.sim.simulator import Simulator
from tests.helpers_manifest import write
from tests.helpers_sharded import SCRIPT, differences, digits, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    ("config", "workers"),
    [
        # partial views, two gossip steps, attackers: control messages and models cross between the processes
        (SimConfig(peers=9, rounds=2, partition="shards:2", seed=3, max_peers=4, attackers=1), 2),
        # the star: the server in the first worker, clients drawn by the driver on all three
        (SimConfig(peers=7, rounds=2, partition="iid", seed=4, mode="fedavg", clients_per_round=4), 3),
    ],
    ids=["gossip-partial-views-attacker", "fedavg"],
)
def test_worker_processes_give_the_local_simulators_results(config: SimConfig, workers: int) -> None:
    script, manifest = digits()
    local = Simulator(script, manifest, config).run()
    run = ProcessSimulation(Simulator(script, manifest, config), workers)
    result = run.run()
    assert local.rounds[-1].mean_accuracy is not None
    assert differences(local, result) == []
    assert result.memory["shards"] == workers
    assert result.attackers == local.attackers


BAD_LOADER = '''
from quinkgl_cli.peer_scripts.digits_peer_script import build_model  # noqa: F401


def build_loaders(manifest, **kwargs):
    return [[1, 2]], None
'''

DIES_IN_A_WORKER = '''
import multiprocessing
import os

import torch

from quinkgl_cli.peer_scripts.digits_peer_script import build_loaders, build_model  # noqa: F401


def loss_fn(output, target):
    if multiprocessing.parent_process() is not None:  # in a worker process, at its first training step
        os._exit(3)
    return torch.nn.functional.cross_entropy(output, target)
'''


def test_an_error_in_a_worker_is_the_local_backends_error(tmp_path: Path) -> None:
    from quinkgl_cli.node.script import load_script

    path = tmp_path / "bad_loader.py"
    path.write_text(BAD_LOADER, encoding="utf-8")
    _, manifest = digits()
    config = SimConfig(peers=4, rounds=1)
    with pytest.raises(NodeConfigError, match="has no map-style dataset") as local:
        Simulator(load_script(path), manifest, config).run()
    with pytest.raises(NodeConfigError) as processes:
        ProcessSimulation(Simulator(load_script(path), manifest, config), 2).run()
    assert processes.value.one_line() == local.value.one_line()
    assert processes.value.code == ExitCode.NODE


def test_a_worker_that_dies_fails_the_run_and_the_other_workers_are_stopped(tmp_path: Path) -> None:
    from quinkgl_cli.node.script import load_script

    path = tmp_path / "dies.py"
    path.write_text(DIES_IN_A_WORKER, encoding="utf-8")
    _, manifest = digits()
    run = ProcessSimulation(Simulator(load_script(path), manifest, SimConfig(peers=4, rounds=3)), 2)
    with pytest.raises(RuntimeError, match=r"shard worker \d exited \(exit code 3\) with calls unanswered"):
        run.run()
    assert multiprocessing.active_children() == []


def test_values_cross_the_pipe_as_json_and_raw_frames() -> None:
    a, b = multiprocessing.Pipe()
    values = [3, b"\x00\xff" * 1000, {"k": [1.5, None]}, b"", "text"]
    send_values(a, {"list": True}, values)
    header, back = recv_values(b)
    assert header == {"list": True}
    assert back == values
    a.close()
    b.close()


def test_worker_count_defaults_to_the_cpus_and_never_exceeds_the_peers() -> None:
    assert worker_count(3, 8) == 3
    assert worker_count(100, 2) == 2
    assert 1 <= worker_count(100, None) <= 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "error: --workers needs --backend processes"),
        (["--backend", "processes", "--workers", "0"], "error: --workers 0 must be at least 1"),
        (["--backend", "threads"], "error: --backend 'threads' is not one of local, processes, ray"),
    ],
    ids=["workers-without-backend", "zero-workers", "unknown-backend"],
)
def test_the_backends_flags_are_checked_in_one_line(args: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    code = run_cli("simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "2", "--rounds", "1",
                   *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE
    assert err[-1].startswith(message)


def test_the_cli_runs_on_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A real CLI process, as a user starts one: its workers are spawned from it.
    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    common = ["simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "5", "--rounds", "2",
              "--partition", "shards:2", "--seed", "7"]
    assert run_cli(*common) == 0
    local = capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "quinkgl_cli", *common, "--backend", "processes", "--workers", "2"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

    def final(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("final ")]

    assert final(done.stdout) == final(local) != []


BUSY_WORKERS = '''
import multiprocessing
import os
import pathlib
import time

from quinkgl_cli.peer_scripts.digits_peer_script import build_loaders as digits_loaders
from quinkgl_cli.peer_scripts.digits_peer_script import build_model  # noqa: F401


def build_loaders(manifest, **kwargs):
    if multiprocessing.parent_process() is not None:  # a worker building its peers: busy for a long while
        pathlib.Path(__file__).with_name(f"building-{os.getpid()}").touch()
        time.sleep(120)
    return digits_loaders(manifest, **kwargs)
'''


def test_a_hang_up_to_the_process_group_ends_the_run_130_and_leaves_no_worker(tmp_path: Path) -> None:
    # A closed terminal sends SIGHUP to the whole group: the workers leave it to the driver, which kills the busy ones.
    import os
    import signal
    import time

    script = tmp_path / "busy.py"
    script.write_text(BUSY_WORKERS, encoding="utf-8")
    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    proc = subprocess.Popen([sys.executable, "-m", "quinkgl_cli", "simulate", "--manifest", str(manifest), "--script",
                             str(script), "--peers", "4", "--rounds", "1", "--backend", "processes", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # a terminal's, not nohup's
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("building-*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never started building"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out[-1000:], err[-1500:])
    assert err.strip().splitlines()[-1] == "interrupted by SIGHUP", err[-1500:]
    deadline = time.monotonic() + 30
    while True:  # every process of the group gone: no worker left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a worker process outlived the run"
        time.sleep(0.05)


def test_a_large_local_run_on_several_cpus_is_told_of_the_processes_backend() -> None:
    from quinkgl_cli.cli.simulate import LARGE_SWARM, one_core_hint

    hint = one_core_hint(LARGE_SWARM, "local", False, 4)
    assert hint == f"{LARGE_SWARM} peers in one process use 1 of 4 CPUs: --backend processes runs them on all, with the same results"
    assert one_core_hint(LARGE_SWARM - 1, "local", False, 4) is None  # a small swarm: seconds anyway
    assert one_core_hint(LARGE_SWARM, "processes", False, 4) is None
    assert one_core_hint(LARGE_SWARM, "local", True, 4) is None  # field conditions: only the local backend has them
    assert one_core_hint(LARGE_SWARM, "local", False, 1) is None
