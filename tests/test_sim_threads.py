"""A local simulation runs NumPy's BLAS on the simulator's thread count, as it runs torch (peers run one after
another: a thread per core only makes each small eigendecomposition wait on the others)."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from quinkgl_cli.node.script import load_script
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from tests.test_sim import SCRIPT, make_manifest


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_blas_runs_on_the_simulators_threads_during_a_run_and_as_before_after() -> None:
    script = load_script(SCRIPT)
    seen: list[set[int]] = []
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        sim = Simulator(script, make_manifest(script), SimConfig(peers=3, rounds=2, seed=1),
                        lambda summary: seen.append(blas_threads()))
        sim.run()
        assert seen == [{1}, {1}]
        assert blas_threads() == before
