"""Local work counted in steps too (`node.localwork`), when a swarm sets the manifest's ``min_local_steps``: a peer
whose ``local_epochs`` passes take fewer optimizer steps makes more whole passes; ``local_steps`` still caps the
round; at the default, 0, and for a peer with enough data, training is exactly ``local_epochs`` passes. A manifest at
the default leaves the field out of its signed bytes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.manifest.canonical import manifest_object, swarm_id
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodeConfig
from quinkgl_cli.node.localwork import local_passes
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

H = "sha256:" + "0" * 64


def test_passes_grow_until_the_round_takes_the_minimum_of_steps() -> None:
    assert local_passes(4, [0] * 3, 48) == 16  # 72 images in batches of 32: 12 steps in 4 epochs
    assert local_passes(1, [0] * 5, 48) == 10  # 50 steps: whole passes, never a partial one
    assert local_passes(4, [0] * 12, 48) == 4  # 48 steps already: unchanged
    assert local_passes(4, [0] * 100, 48) == 4
    assert local_passes(4, [], 48) == 4  # no batches: nothing to count
    assert local_passes(4, [0] * 3, 0) == 4  # the floor off


def test_a_loader_without_a_length_keeps_its_epochs() -> None:
    def stream() -> Iterator[int]:
        yield from range(3)

    assert local_passes(2, stream(), 48) == 2


def manifest(**training: Any) -> Manifest:
    return Manifest(
        name="localwork-test", created_at=datetime(2026, 1, 1, tzinfo=UTC),
        task={"type": "classification", "input_shape": (4,), "output_shape": (3,), "label_type": "integer"},
        data_schema_hash=H, model={"framework": "pytorch", "arch_hash": H}, aggregation={"name": "FedAvg"},
        topology={"name": "FullTopology"}, training=training,
    )


def node(m: Manifest, samples: int) -> Node:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(samples, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(samples) % 3
    train = DataLoader(TensorDataset(x, y), batch_size=10)
    transport = MemoryTransport(MemoryNetwork(), "p0", swarm_id="s", arch_hash=H)
    return Node(NodeConfig("p0", rounds=2), m, "sha256:swarm", model, train, None,
                torch.optim.Adam(model.parameters(), lr=1e-3), transport, clock=lambda: 0.0)


@pytest.mark.parametrize(("samples", "training", "steps"), [
    (30, {"local_epochs": 1, "min_local_steps": 48}, 48),  # 3 batches: 16 passes
    (30, {"local_epochs": 1}, 3),  # the default: no floor, one pass
    (30, {"local_epochs": 2, "min_local_steps": 10}, 12),  # 4 passes
    (30, {"local_epochs": 1, "local_steps": 5, "min_local_steps": 48}, 5),  # the manifest's cap wins
    (45, {"local_epochs": 2, "min_local_steps": 48}, 50),  # 5 batches (the last one short): whole passes, 10 of them
    (600, {"local_epochs": 1, "min_local_steps": 48}, 60),  # 60 batches: one pass, as before
])
def test_a_round_trains_at_least_the_minimum_of_steps(samples: int, training: dict[str, int], steps: int) -> None:
    peer = node(manifest(**training), samples)
    peer.begin_round()
    stats = peer.train_round()
    assert stats.steps == steps
    assert stats.samples == samples  # the weight it reports is still its data, not the work it did


def test_a_manifest_at_the_default_floor_keeps_the_bytes_it_had_before_the_field() -> None:
    default = manifest(local_epochs=2)
    assert "min_local_steps" not in manifest_object(default)["training"]
    assert swarm_id(default) == swarm_id(manifest(local_epochs=2, min_local_steps=0))
    floored = manifest(local_epochs=2, min_local_steps=48)
    assert manifest_object(floored)["training"]["min_local_steps"] == 48  # another value is signed with the rest
    assert swarm_id(floored) != swarm_id(default)
    assert Manifest.model_validate(manifest_object(floored)).training.min_local_steps == 48
