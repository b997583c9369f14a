"""The sharded schedule behind `simulate --backend ray`, run in this process (no Ray needed): the same results as
the local simulator for a seed, whatever the split into shards; the shard wire format; the backend's flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quinkgl_cli.errors import NodeConfigError, UsageError
from quinkgl_cli.sim import shardwire
from quinkgl_cli.sim.config import Overrides, SimConfig
from quinkgl_cli.sim.shard import owners_of
from quinkgl_cli.sim.sharded import ShardedRun
from quinkgl_cli.sim.simulator import Simulator
from quinkgl_cli.transport.memory import _Offer
from tests.helpers_manifest import write
from tests.helpers_sharded import SCRIPT, InProcess, differences, digits, run_cli


@pytest.mark.parametrize(
    ("config", "shards"),
    [
        # every peer knows every other; fingerprints at discovery, one gossip step a round, a consensus phase
        (SimConfig(peers=9, rounds=2, partition="shards:2", seed=3), 3),
        # partial views (a random graph of at most 4 known peers each) and Cyclon's shuffles: control messages
        # answered by control messages, several waves deep
        (SimConfig(peers=12, rounds=2, partition="iid", seed=5, max_peers=4,
                   overrides=Overrides(topology="CyclonTopology", training_params={"gossip_steps": "2"})), 4),
        # attackers, top-k compression with error feedback (per-peer delta chains), one shard holding most peers
        (SimConfig(peers=7, rounds=2, partition="dirichlet:0.5", seed=1, attackers=2,
                   overrides=Overrides(compression_params={"top_k_ratio": "0.1", "error_feedback": "true"})), 2),
        (SimConfig(peers=6, rounds=2, seed=2, mode="local"), 3),
        # the star: the server (first shard) broadcasts to clients drawn by the driver, some on every shard
        (SimConfig(peers=8, rounds=3, partition="shards:2", seed=4, mode="fedavg", clients_per_round=5), 3),
        # drawn edges whose ends sit on different shards; partial views make the graph sparse
        (SimConfig(peers=10, rounds=2, partition="shards:2", seed=6, mode="pairwise", pairs_per_round=7,
                   max_peers=3, attackers=1), 3),
    ],
    ids=["full-view", "cyclon-partial-views", "attackers-compression", "local-mode", "fedavg", "pairwise"],
)
def test_a_sharded_run_gives_the_local_simulators_results(config: SimConfig, shards: int) -> None:
    script, manifest = digits()
    local = Simulator(script, manifest, config).run()
    sim = Simulator(script, manifest, config)
    sharded = ShardedRun(sim, InProcess(sim, shards), "test").run()
    assert local.rounds[-1].mean_accuracy is not None
    assert differences(local, sharded) == []
    assert sharded.node_ids == local.node_ids and sharded.attackers == local.attackers
    assert sharded.memory["shards"] == shards
    assert sharded.memory["known_peers_mean"] == local.memory["known_peers_mean"]


def test_a_sharded_pairwise_run_without_edges_is_refused_as_the_local_one_is() -> None:
    script, manifest = digits()
    config = SimConfig(peers=1, rounds=1, mode="pairwise")
    with pytest.raises(NodeConfigError, match="gives the peers no edge to average over") as local:
        Simulator(script, manifest, config).run()
    sim = Simulator(script, manifest, config)
    with pytest.raises(NodeConfigError, match="gives the peers no edge to average over") as sharded:
        ShardedRun(sim, InProcess(sim, 1), "test").run()
    assert str(sharded.value) == str(local.value)


def test_settings_the_sharded_schedule_does_not_know_are_refused_unless_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from quinkgl_cli.sim import sharded

    script, manifest = digits()
    # As a setting added to SimConfig later (field conditions) would be: here --threads stands in for one.
    monkeypatch.setattr(sharded, "SHARDED_SETTINGS", tuple(s for s in sharded.SHARDED_SETTINGS if s != "threads"))
    with pytest.raises(UsageError, match="the ray backend does not simulate threads yet"):
        sharded.check_mode(Simulator(script, manifest, SimConfig(peers=2, rounds=1, threads=2)), "ray")
    sharded.check_mode(Simulator(script, manifest, SimConfig(peers=2, rounds=1)), "ray")  # at its default: runs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--drop", "0.1"], "the ray backend does not simulate field conditions (--latency"),
        (["--gossip-interval", "5"], "the ray backend does not simulate field conditions (--latency"),
    ],
    ids=["drop", "gossip-interval"],
)
def test_what_the_ray_backend_does_not_simulate_is_a_one_line_error_before_ray_is_imported(
    extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without Ray: the reason comes first, whether Ray is installed or not, and no Ray is started for it.
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(name, "0")
    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    code = run_cli("simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "2", "--rounds", "1",
                   "--backend", "ray", *extra)
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {message}")


def test_owners_are_contiguous_blocks_in_join_order() -> None:
    ids = [f"p{i}" for i in range(10)]
    owners = owners_of(ids, 3)
    assert [owners[i] for i in ids] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(owners_of(ids[:2], 3).values()) == {0, 1}


def test_a_shard_batch_round_trips_as_bytes_and_refuses_garbage() -> None:
    offer = _Offer(sender="a", recipient="b", round=3, size=4, digest=b"\x01" * 32, nonce=9, encoding="qgl-tensors/1",
                   sample_count=12, meta={"label_entropy": 1.5, "gossip_to": ["b", "c"]}, payload=b"\x00\xffab")
    batch = shardwire.Batch(offers=[((4, 0), offer)],
                            messages=[((2, 1, 0), shardwire.Message("c", "b", "fingerprint", b'{"x":1}'))],
                            acks={"a": (100, 2)})
    back = shardwire.decode(shardwire.encode(batch))
    assert back == batch
    assert shardwire.decode(b"") == shardwire.Batch()
    for bad in (b"\x00\x00\x00\x05{}", b"\x00\x00\x00\x02{}\x00\x00\x00\x00", shardwire.encode(batch)[:-1]):
        with pytest.raises(ValueError, match="shard batch"):
            shardwire.decode(bad)


def test_backend_ray_without_ray_installed_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(name, "0")  # restored afterwards: the backend sets them before importing Ray
    manifest = write(tmp_path / "swarm.qgl", digits()[1])
    code = run_cli("simulate", "--manifest", str(manifest), "--script", str(SCRIPT), "--peers", "2", "--rounds", "1",
                   "--backend", "ray")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: --backend ray needs Ray, which is not installed")
    assert "pip install 'quinkgl-cli[ray]'" in err[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "spark"], "--backend 'spark' is not one of local, processes, ray"),
        (["--ray-address", "127.0.0.1:6379"], "need --backend ray"),
        (["--backend", "ray", "--ray-address", "10.1.2.3:6379"], "--ray-address 10.1.2.3:6379 is not on loopback"),
        (["--backend", "ray", "--ray-address", "127.0.0.1"], "is not HOST:PORT"),
        (["--backend", "ray", "--peers-per-actor", "0"], "--peers-per-actor 0 must be at least 1"),
    ],
)
def test_backend_flags_are_checked_before_anything_loads(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The manifest does not exist: a flag refused first never reaches it.
    code = run_cli("simulate", "--manifest", "absent.qgl", "--script", str(SCRIPT), *extra)
    assert code == 1
    assert message in capsys.readouterr().err


def test_a_ray_cluster_that_cannot_be_joined_is_a_network_error() -> None:
    from types import SimpleNamespace

    from quinkgl_cli.errors import NetworkError
    from quinkgl_cli.sim.raybackend import connect

    def refuse(**kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    fake = SimpleNamespace(is_initialized=lambda: False, init=refuse)
    with pytest.raises(NetworkError, match="cannot join the Ray cluster at 127.0.0.1:1") as caught:
        connect(fake, "127.0.0.1:1")  # type: ignore[arg-type]
    assert "RAY_AUTH_MODE=token" in caught.value.hint
