"""The field driver: the daemon's round loop for every peer on one virtual-time event loop, under latency,
bandwidth, loss, churn, late joiners and slow peers; deterministic for a seed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from quinkgl_cli.cli.app import app
from quinkgl_cli.errors import UsageError
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import write_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.attacks import Eavesdrop
from quinkgl_cli.sim.dist import parse_dist
from quinkgl_cli.sim.field import FieldSimulator
from quinkgl_cli.sim.fieldconf import field_config
from quinkgl_cli.sim.simulator import SimConfig, Simulator, make_simulator
from quinkgl_cli.sim.vloop import VirtualTimeDeadlock, VirtualTimeLoop

SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


@pytest.fixture(scope="module")
def script() -> PeerScript:
    return load_script(SCRIPT)


def manifest(script: PeerScript, **training: Any) -> Manifest:
    training = {"local_epochs": 1, "final_consensus_steps": 1, **training}
    return build_manifest(
        name="digits-field", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={k: str(v) for k, v in training.items()},
    )


def run(script: PeerScript, m: Manifest, peers: int = 5, rounds: int = 4, seed: int = 3, **flags: Any) -> FieldSimulator:
    sim = make_simulator(script, m, SimConfig(peers=peers, rounds=rounds, partition="shards:2", seed=seed,
                                              conditions=field_config(**flags)))
    assert isinstance(sim, FieldSimulator)
    sim.result = sim.run()  # type: ignore[attr-defined]
    return sim


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_virtual_loop_jumps_to_the_next_timer_and_refuses_a_deadlock() -> None:
    clock = _Clock()

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        seen: list[float] = []
        loop.call_later(7.5, lambda: seen.append(loop.time()))
        await asyncio.sleep(3600)
        seen.append(loop.time())
        return seen

    assert VirtualTimeLoop(clock).run_virtual(main()) == [7.5, 3600.0]

    async def stuck() -> None:
        await asyncio.Event().wait()

    with pytest.raises(VirtualTimeDeadlock):
        VirtualTimeLoop(_Clock()).run_virtual(stuck())


def test_same_seed_same_curve_under_field_conditions(script: PeerScript) -> None:
    m = manifest(script)
    flags = dict(latency="uniform:0.01:0.3", bandwidth="lognormal:200000:0.5", drop=0.1, churn=0.2,
                 churn_fresh=0.5, speed="straggler:1:0.3:6", gossip_interval=5.0)
    a = run(script, m, **flags).result  # type: ignore[attr-defined]
    b = run(script, m, **flags).result  # type: ignore[attr-defined]
    c = run(script, m, seed=4, **flags).result  # type: ignore[attr-defined]
    curve = [[(p.peer, p.val_accuracy) for p in r.peers] for r in a.rounds]
    assert curve == [[(p.peer, p.val_accuracy) for p in r.peers] for r in b.rounds]
    assert a.final.mean_accuracy == b.final.mean_accuracy and a.timing["virtual_s"] == b.timing["virtual_s"]
    assert a.conditions == b.conditions
    assert a.conditions["messages_lost"] > 0 and a.conditions["departures"] > 0
    assert (a.conditions, a.final.mean_accuracy) != (c.conditions, c.final.mean_accuracy)


def test_drop_everything_and_nobody_aggregates(script: PeerScript) -> None:
    sim = run(script, manifest(script), drop=1.0)
    assert sim.network.lost > 0 and sim.network.carried == 0  # type: ignore[attr-defined]
    rounds = [m for p in sim.peers for m in p.rounds.values()]
    assert len(rounds) == 5 * 4 and all(m["peers"] == 0 and m["bytes_received"] == 0 for m in rounds)
    # and without loss the same swarm does aggregate, so the check above can fail
    ideal = run(script, manifest(script), drop=0.0)
    assert all(m["peers"] > 0 for p in ideal.peers for m in p.rounds.values())


def test_a_straggler_takes_longer_and_its_late_updates_meet_the_staleness_rule(script: PeerScript) -> None:
    sim = run(script, manifest(script, max_staleness=0), peers=4, rounds=5, seed=9,
              speed="straggler:1:0.4:20", gossip_interval=5.0)
    slow = [p for p in sim.peers if p.train_seconds == 20.0]
    fast = [p for p in sim.peers if p.train_seconds == 1.0]
    assert len(slow) == 1 and fast, "seed 9 draws one straggler"
    # a round of the straggler lasts its training (20 s) at least; the others keep near the 5 s interval
    assert min(m["duration"] for p in slow for m in p.rounds.values()) >= 20.0
    assert max(m["duration"] for p in fast for m in p.rounds.values()) < 20.0
    # with max_staleness 0 the others drop its updates of past rounds as stale on arrival
    assert sum(m["updates_dropped"] for p in fast for m in p.rounds.values()) > 0
    # a fast peer finishes far ahead of it in virtual time
    result = sim.result  # type: ignore[attr-defined]
    assert result.timing["virtual_s"] >= 5 * 20.0


def test_a_straggler_left_alone_at_its_end_still_counts_in_the_final_mean(script: PeerScript) -> None:
    """The straggler ends after every other peer has left, so its final consensus is skipped; like the daemon's
    ``finished`` line, the final reports its last round's evaluation instead of leaving it out."""
    sim = run(script, manifest(script), peers=3, rounds=3, seed=6, speed="straggler:1:0.4:20", gossip_interval=5.0)
    result = sim.result  # type: ignore[attr-defined]
    slow = next(p for p in sim.peers if p.train_seconds == 20.0)
    assert not slow.node.known_peers, "every other peer left before the straggler's last round ended"
    assert [p.peer for p in result.consensus.peers] == [p.node.node_id for p in sim.peers]
    assert slow.final is not None and slow.final["val_accuracy"] == slow.rounds[3]["val_accuracy"]


def test_a_straggler_is_paced_for_under_a_looser_staleness_bound(script: PeerScript,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="quinkgl.daemon"):
        run(script, manifest(script, max_staleness=1), peers=4, rounds=8, seed=9, speed="straggler:1:0.4:8",
            gossip_interval=4.0)
    assert any(r.getMessage().startswith("paced") for r in caplog.records)


def test_churned_peers_return_with_or_without_their_checkpoints(script: PeerScript,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="quinkgl.sim"):
        kept = run(script, manifest(script), peers=6, rounds=6, churn=0.3, gossip_interval=5.0)
    joined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sim-peer-joined")]
    c = kept.result.conditions  # type: ignore[attr-defined]
    assert c["departures"] > 0 and c["returns_from_checkpoint"] == c["departures"] and c["returns_from_scratch"] == 0
    assert joined and all("from_round=0" not in line for line in joined)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="quinkgl.sim"):
        fresh = run(script, manifest(script), peers=6, rounds=6, churn=0.3, churn_fresh=1.0, gossip_interval=5.0)
    joined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sim-peer-joined")]
    c = fresh.result.conditions  # type: ignore[attr-defined]
    assert c["returns_from_scratch"] == c["departures"] > 0 and c["returns_from_checkpoint"] == 0
    assert joined and all("from_round=0" in line for line in joined)
    # every peer still ends the run, its last incarnation having completed the last round
    assert all(p.node.completed_round == 6 for p in fresh.peers)


def test_late_joiners_arrive_mid_run_from_scratch(script: PeerScript) -> None:
    sim = run(script, manifest(script), peers=8, rounds=6, late_join=0.25, gossip_interval=5.0)
    late = [p for p in sim.peers if p.fresh]
    assert sim.result.conditions["late_joins"] == len(late) == 2  # type: ignore[attr-defined]
    # they joined within the run's first half, after the others' first round, and still finish the run
    assert all(0 < p.joined_at[0] <= 6 * 5.0 / 2 for p in late)
    assert all(p.joined_at == [0.0] for p in sim.peers if not p.fresh)
    assert all(p.node.completed_round == 6 for p in sim.peers)
    late_ids = {p.node.node_id for p in late}
    first_round = [p.rounds[1] for p in sim.peers if not p.fresh]
    assert all(not late_ids & set(m["peer_ids"]) for m in first_round) and all(m["peer_ids"] for m in first_round)


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--latency", "uniform:0.2:0.1", "LO <= HI"),
    ("--latency", "-1", "0 or more"),
    ("--bandwidth", "0", "above 0"),
    ("--speed", "pareto:1", "unknown distribution"),
    ("--speed", "straggler:1:0.1", "takes 3 numbers"),
    ("--drop", "1.5", "share"),
    ("--churn", "1", "share"),
    ("--gossip-interval", "0", "above 0"),
])
def test_bad_field_flags_are_one_line_usage_errors(script: PeerScript, tmp_path: Path, flag: str, value: str,
                                                   needle: str) -> None:
    qgl = tmp_path / "swarm.qgl"
    write_manifest(qgl, manifest(script))
    res = CliRunner().invoke(app, ["simulate", "--manifest", str(qgl), "--script", str(SCRIPT), "--peers", "3",
                                   "--rounds", "1", flag, value])
    assert res.exit_code == 1, res.output
    message = str(res.exception) if isinstance(res.exception, UsageError) else res.output
    assert needle in message and flag in message and "\n" not in message.strip()


def test_field_flags_need_gossip_mode_and_none_keeps_lockstep(script: PeerScript) -> None:
    with pytest.raises(UsageError, match="--mode gossip"):
        make_simulator(script, manifest(script), SimConfig(peers=3, rounds=1, mode="local",
                                                           conditions=field_config(drop=0.1)))
    assert type(make_simulator(script, manifest(script), SimConfig(peers=3, rounds=1))) is Simulator
    assert field_config() is None
    with pytest.raises(UsageError, match="FACTOR"):
        parse_dist("--speed", "straggler:1:0.1:0", "s")


def test_cli_runs_under_field_conditions(script: PeerScript, tmp_path: Path) -> None:
    qgl = tmp_path / "swarm.qgl"
    write_manifest(qgl, manifest(script))
    res = CliRunner().invoke(app, ["simulate", "--manifest", str(qgl), "--script", str(SCRIPT), "--peers", "4",
                                   "--rounds", "3", "--latency", "0.05", "--drop", "0.1", "--speed",
                                   "straggler:1:0.25:10", "--churn", "0.25"])
    assert res.exit_code == 0, res.output
    assert sum(1 for ln in res.output.splitlines() if ln.startswith("round=")) == 3
    assert "final mean_accuracy=" in res.output


def write_trace(path: Path) -> Path:
    """Three daemons: peer-a trains fast; peer-b trains 8 s a round, is stopped by a signal at 12 s and resumes at
    25 s; peer-c joins at 15 s and never gets peer-a's models (every fetch from it failed)."""
    from datetime import UTC, datetime, timedelta

    from quinkgl_cli.node.trace import Header, NodeStart, NodeStop, Train, Transfer, encode_record

    t0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def header(node: str, after: float) -> Header:
        return Header(swarm="sha256:" + "0" * 64, node=node, started_at=t0 + timedelta(seconds=after))

    records: list[Any] = [header("peer-a", 0), NodeStart(t=0.0, round=0)]
    records += [Train(t=5.0 * r, round=r, seconds=1.0, samples=100) for r in range(1, 7)]
    records += [NodeStop(t=40.0, round=6, reason="finished")]
    records += [header("peer-b", 0), NodeStart(t=0.0, round=0), Train(t=9.0, round=1, seconds=8.0, samples=100),
                NodeStop(t=12.0, round=1, reason="signal"),
                header("peer-b", 25), NodeStart(t=0.0, round=1)]
    records += [Train(t=8.0 * r, round=r, seconds=8.0, samples=100) for r in range(2, 7)]
    records += [NodeStop(t=60.0, round=6, reason="finished")]
    records += [header("peer-c", 15), NodeStart(t=0.0, round=0)]
    records += [Transfer(t=1.0 + r, direction="receive", peer="peer-a", round=r, bytes=1000, seconds=0.2,
                         path="direct", ok=False) for r in range(0, 7)]
    records += [Transfer(t=1.0 + r, direction="receive", peer="peer-b", round=r, bytes=1000, seconds=0.3,
                         path="direct", ok=True) for r in range(0, 7)]
    records += [Train(t=5.0 * r, round=r, seconds=1.0, samples=100) for r in range(1, 7)]
    path.write_text("".join(encode_record(r) for r in records))
    return path


def test_a_recorded_trace_replays_training_times_transfers_and_presence(script: PeerScript, tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "swarm.trace")
    sim = run(script, manifest(script), peers=3, rounds=6, trace=trace, gossip_interval=5.0)
    a, b, c = sim.peers
    result = sim.result  # type: ignore[attr-defined]
    cond = result.conditions
    assert cond["departures"] == 1 and cond["returns_from_checkpoint"] == 1 and cond["late_joins"] == 1
    assert b.left == 1 and b.resumed == 1 and c.fresh == 1 and a.left == 0
    # peer-b's rounds last its recorded 8 s of training at least; peer-a's do not
    assert min(m["duration"] for m in b.rounds.values()) >= 8.0
    assert max(m["duration"] for m in a.rounds.values()) < 8.0
    # every model of peer-a's to peer-c is lost, as its fetches were; peer-c still aggregates peer-b's
    assert cond["messages_lost"] > 0
    assert all(a.node.node_id not in m["peer_ids"] for m in c.rounds.values())
    assert any(b.node.node_id in m["peer_ids"] for m in c.rounds.values())
    # each node joined when its sessions started: peer-c 15 s in, peer-b back at 25 s
    assert a.joined_at == [0.0] and b.joined_at == [0.0, 25.0] and c.joined_at == [15.0]
    again = run(script, manifest(script), peers=3, rounds=6, trace=trace, gossip_interval=5.0)
    assert again.result.final.mean_accuracy == result.final.mean_accuracy  # type: ignore[attr-defined]


def test_a_replay_charges_each_rounds_recorded_evaluation_and_saving(script: PeerScript, tmp_path: Path) -> None:
    """A daemon's round loop waits for its evaluation and its end-of-round checkpoint too: a straggler that runs
    its rounds back to back is slower by them than its training alone says, and so must its replay be."""
    from datetime import UTC, datetime

    from quinkgl_cli.node.trace import Header, NodeStart, NodeStop, Train, encode_record

    def header(node: str) -> Header:
        return Header(swarm="sha256:" + "0" * 64, node=node, started_at=datetime(2026, 12, 3, 12, 0, tzinfo=UTC))

    records: list[Any] = [header("fast"), NodeStart(t=0.0, round=0)]
    records += [Train(t=5.0 * r, round=r, seconds=1.0, samples=100) for r in range(1, 4)]
    records += [NodeStop(t=20.0, round=3, reason="finished"), header("slow"), NodeStart(t=0.0, round=0)]
    records += [Train(t=11.0 * r, round=r, seconds=8.0, samples=100, eval_seconds=1.0, save_seconds=2.0)
                for r in range(1, 4)]
    records += [NodeStop(t=33.0, round=3, reason="finished")]
    trace = tmp_path / "swarm.trace"
    trace.write_text("".join(encode_record(r) for r in records))
    sim = run(script, manifest(script), peers=2, rounds=3, trace=trace, gossip_interval=5.0)
    slow = sim.peers[1]
    assert min(m["duration"] for m in slow.rounds.values()) >= 8.0 + 1.0  # training, then its evaluation
    assert sim.result.timing["virtual_s"] >= 3 * (8.0 + 1.0 + 2.0)  # type: ignore[attr-defined]


def test_a_trace_must_fit_the_swarm_and_replaces_drawn_conditions(script: PeerScript, tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "swarm.trace")
    with pytest.raises(UsageError, match="holds 3 nodes"):
        run(script, manifest(script), peers=4, rounds=2, trace=trace)
    with pytest.raises(UsageError, match="--speed cannot be added"):
        field_config(trace=trace, speed="2")
    bad = tmp_path / "bad.trace"
    bad.write_text('{"kind": "train"}\n')
    with pytest.raises(UsageError, match="bad.trace:1"):
        run(script, manifest(script), peers=3, rounds=2, trace=bad)


def test_ideal_conditions_on_a_full_topology_reproduce_the_lockstep_run(script: PeerScript) -> None:
    """Every peer hears from every other each step, so no wait runs to its deadline and nobody paces: the daemon's
    loop in virtual time must then give exactly the lockstep simulator's numbers."""
    m = manifest(script)
    cfg = dict(peers=5, rounds=3, partition="shards:2", seed=3)
    lockstep = make_simulator(script, m, SimConfig(**cfg)).run()
    field = run(script, m, peers=5, rounds=3, seed=3, gossip_interval=10.0).result  # type: ignore[attr-defined]
    assert [[p.val_accuracy for p in r.peers] for r in field.rounds] == \
        [[p.val_accuracy for p in r.peers] for r in lockstep.rounds]
    assert field.final.mean_accuracy == lockstep.final.mean_accuracy
    # one interval per round but the last, which ends once every update arrived (1 s of training after its start)
    assert field.timing["virtual_s"] == 2 * 10.0 + 1.0


def test_a_sleep_shorter_than_the_clock_resolution_still_lets_time_pass() -> None:
    """A round loop sleeps 'until the deadline' again while time is short of it: a timer that ran without moving
    the clock (due within the loop's resolution) would make that loop spin forever."""
    async def busy() -> None:  # another peer with work ready at that moment: the loop does not block meanwhile
        await asyncio.sleep(3.0)
        for _ in range(50):
            await asyncio.sleep(0)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        other = asyncio.ensure_future(busy())
        deadline = loop.time() + 3.0 + 4e-10
        await asyncio.sleep(3.0)
        sleeps = 0
        while loop.time() < deadline:
            await asyncio.sleep(deadline - loop.time())
            sleeps += 1
        await other
        return sleeps

    assert VirtualTimeLoop(_Clock()).run_virtual(main()) <= 2


def test_a_churned_attacker_keeps_what_it_heard(script: PeerScript) -> None:
    sim = make_simulator(script, manifest(script), SimConfig(
        peers=6, rounds=6, partition="shards:2", seed=3, attackers=2, attack="alie",
        conditions=field_config(churn=0.3, churn_fresh=1.0, gossip_interval=5.0)))
    assert isinstance(sim, FieldSimulator)
    sim.run()
    attackers = [p for p in sim.peers if p.node.node_id in sim.attackers]
    assert any(len(p.joined_at) > 1 for p in attackers)  # an attacker left and came back, rebuilt
    for p in sim.peers:
        heard = p.node.aggregator
        assert isinstance(heard, Eavesdrop) == (p in attackers)
        if isinstance(heard, Eavesdrop):
            assert heard.received and p.node.exchange.tamper is not None
