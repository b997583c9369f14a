"""The benchmark prototype's step floor (`benchmarks/levers_proto.py`, knob ``min_steps``; `bench_learning.py --lever
min-stepsN`): the numbers in benchmarks/LEARNING.md, "Local work counted in steps", rest on it making whole passes
until at least N optimizer steps (the node's own `local_passes`, tested in tests/test_localwork.py), and on leaving
the node as it is otherwise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_learning import adam_swarm

PROTO = Path(__file__).resolve().parents[1] / "benchmarks" / "levers_proto.py"


@pytest.fixture(scope="module")
def proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("levers_proto", PROTO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["levers_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_the_knob_sets_each_peers_passes_and_training_takes_them(proto: ModuleType, tmp_path: Path) -> None:
    # adam_swarm: 4 peers of 4 and 6 batches, 4 local epochs (16-24 steps a round).
    with proto.patched({"min_steps": 48}):
        floored = adam_swarm(tmp_path, 1, True, rounds=1)
    assert [n.trainer.local_epochs for n in floored.nodes] == [12, 8, 8, 12]
    node = floored.nodes[0]
    node.begin_round()
    assert node.train_round().steps == 48
    plain = adam_swarm(tmp_path, 1, True, rounds=1)
    assert [n.trainer.local_epochs for n in plain.nodes] == [4, 4, 4, 4]
