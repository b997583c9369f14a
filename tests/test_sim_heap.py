"""The garbage collector around a simulation (`quinkgl_cli.sim.heap`): paused while the swarm is built, the
swarm frozen out of its walks while the rounds run, and the collector as it was afterwards."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim import swarm as swarm_module
from quinkgl_cli.sim.heap import collector_paused, survivors_frozen
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from tests.test_sim import SCRIPT, make_manifest


@pytest.fixture
def collector_on() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.enable()
    yield
    if not enabled:
        gc.disable()


def test_the_collector_is_paused_only_inside_the_block(collector_on: None) -> None:
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()


def test_survivors_are_frozen_only_inside_the_block_and_an_earlier_freeze_is_left_alone() -> None:
    assert gc.get_freeze_count() == 0
    with survivors_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with survivors_frozen():
            assert gc.get_freeze_count() == before
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_a_run_builds_with_the_collector_paused_and_rounds_run_with_the_swarm_frozen(
        collector_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    during_build: list[bool] = []
    build = swarm_module.SwarmBuilder.build

    def watched(self: swarm_module.SwarmBuilder, *args: object) -> swarm_module.Swarm:
        during_build.append(gc.isenabled())
        return build(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(swarm_module.SwarmBuilder, "build", watched)
    frozen: list[int] = []
    script = load_script(SCRIPT)
    sim = Simulator(script, make_manifest(script, final_consensus_steps=2), SimConfig(peers=4, rounds=2, seed=1),
                    lambda summary: frozen.append(gc.get_freeze_count()))
    sim.run()
    assert during_build == [False]
    assert len(frozen) == 3 and all(n > 0 for n in frozen)  # two rounds and the consensus phase
    assert gc.isenabled() and gc.get_freeze_count() == 0
