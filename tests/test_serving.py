"""The serving model part: the weighted mean of the latest own and peer models, bounded in age and weight, and its
checkpoint state."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from quinkgl_cli.node.serving import ServingModel
from quinkgl_cli.strategies.base import PeerUpdate
from quinkgl_cli.tensors import flatten, load_flat


def model_at(value: float) -> nn.Module:
    m = nn.Linear(2, 1)
    load_flat(m, torch.full((3,), value))
    return m


def update(peer: str, round_: int, value: float, samples: int = 10) -> PeerUpdate:
    return PeerUpdate(peer, round_, torch.full((3,), value), samples)


def json_round_trip(state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = state
    return tensors, json.loads(json.dumps(meta))


def served(s: ServingModel, round_: int) -> list[float]:
    return flatten(s.model(round_)).tolist()


def test_serves_the_sample_weighted_mean_of_own_and_latest_peer_models() -> None:
    own = model_at(0.0)
    s = ServingModel(own, enabled=True, max_weight_ratio=10.0)
    assert s.model(1) is own  # nothing noted yet: the node's own model
    s.note_own(1, samples=10)
    s.note_peers([update("a", 1, 3.0, samples=10), update("b", 1, 6.0, samples=20)])
    assert served(s, 1) == pytest.approx([3.75] * 3)  # (0*10 + 3*10 + 6*20) / 40
    load_flat(own, torch.full((3,), 100.0))  # aggregation changes the held model: the served one keeps what was noted
    assert served(s, 1) == pytest.approx([3.75] * 3)
    assert flatten(own).tolist() == [100.0] * 3


def test_newest_model_per_peer_wins_and_old_ones_age_out() -> None:
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=10.0, max_age=3)
    s.note_own(5, samples=10)
    s.note_peers([update("a", 5, 4.0)])
    s.note_peers([update("a", 4, 100.0)])  # an older round never replaces a newer one
    assert served(s, 5) == pytest.approx([2.0] * 3)
    s.note_own(9, samples=10)  # a was last heard in round 5: more than 3 rounds ago at round 9
    assert served(s, 9) == pytest.approx([0.0] * 3)
    tensors, meta = s.state_dict()
    assert meta["peers"] == [] and list(tensors) == ["serving.own"]  # no longer held, nor checkpointed


def test_a_claimed_future_round_ages_out_like_the_current_one() -> None:
    # A peer claiming round 1,000,000 (issue 12 item 2): its model was served for good, never old enough to drop.
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=10.0, max_age=3)
    s.note_peers([update("quiet", 4, 0.0)], current_round=4)
    s.note_own(5, samples=10)
    s.note_peers([update("liar", 1_000_000, 4.0)], current_round=5)
    assert served(s, 5) == pytest.approx([4.0 / 3] * 3)
    s.note_own(9, samples=10)
    assert served(s, 9) == pytest.approx([0.0] * 3)


def test_refused_peers_leave_the_served_model() -> None:
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=10.0)
    s.note_own(1, samples=10)
    s.note_peers([update("a", 1, 4.0), update("b", 1, 0.0)])
    s.note_peers([], refused=["a"])
    assert served(s, 1) == pytest.approx([0.0] * 3)


def test_a_peer_claiming_huge_counts_gets_a_bounded_share() -> None:
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=2.0)
    s.note_own(1, samples=10)
    s.note_peers([update("liar", 1, 9.0, samples=1 << 31), update("b", 1, 0.0)])
    assert served(s, 1)[0] <= 9.0 * 2.0 / 3.0 + 1e-6  # at most max_ratio / n of the mean


def test_remembers_at_most_max_models_peers_dropping_the_least_recently_heard() -> None:
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=100.0, max_models=2)
    s.note_own(1, samples=10)
    s.note_peers([update("a", 1, 3.0), update("b", 1, 3.0)])
    s.note_peers([update("a", 2, 3.0)])  # a heard again: b is now the least recent
    s.note_peers([update("c", 2, 3.0)])
    tensors, meta = s.state_dict()
    assert [p["peer"] for p in meta["peers"]] == ["a", "c"]


def test_disabled_serves_the_held_model() -> None:
    own = model_at(1.0)
    s = ServingModel(own, enabled=False, max_weight_ratio=2.0)
    s.note_own(1, samples=10)
    s.note_peers([update("a", 1, 5.0)])
    assert s.model(1) is own and s.state_dict() == ({}, {"own": None, "peers": []})


def test_state_survives_a_checkpoint_round_trip_and_bad_entries_are_refused() -> None:
    s = ServingModel(model_at(0.0), enabled=True, max_weight_ratio=10.0)
    s.note_own(3, samples=10)
    s.note_peers([update("a", 3, 3.0), update("b", 2, 6.0, samples=30)])
    tensors, meta = s.state_dict()
    again = ServingModel(model_at(7.0), enabled=True, max_weight_ratio=10.0)
    again.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    assert served(again, 3) == served(s, 3)
    empty = ServingModel(model_at(7.0), enabled=True, max_weight_ratio=10.0)
    empty.load_state_dict({}, None)  # a checkpoint from before serving existed
    assert served(empty, 3) == [7.0] * 3
    bad = dict(tensors)
    bad["serving.peer.0"] = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match="serving entry"):
        again.load_state_dict(bad, meta)
    short = dict(tensors)
    short["serving.own"] = torch.zeros(2)
    with pytest.raises(ValueError, match="serving entry"):
        again.load_state_dict(short, meta)


def test_the_end_of_run_merge_ends_serving() -> None:
    own = model_at(1.0)
    s = ServingModel(own, enabled=True, max_weight_ratio=10.0)
    s.note_own(4, samples=10)
    s.note_peers([update("a", 4, 5.0)])
    s.merged()
    s.note_own(4, samples=10)
    s.note_peers([update("a", 4, 9.0)])
    assert s.model(4) is own and s.state_dict()[0] == {}


def test_when_this_rounds_aggregations_heard_every_served_peer_the_held_model_is_served() -> None:
    # Four peers that all hear each other every round: the held model aggregated the very models the average would
    # hold, with the rule's momentum, and swings less (benchmarks/LEARNING.md).
    held = model_at(7.0)
    s = ServingModel(held, enabled=True, max_weight_ratio=10.0)
    s.note_own(3, samples=10)
    s.note_peers([update("a", 3, 1.0)], current_round=3)
    s.note_peers([update("b", 3, 2.0), update("c", 3, 3.0)], current_round=3)  # a second gossip step, same round
    assert s.model(3) is held
    restored = ServingModel(held, enabled=True, max_weight_ratio=10.0)
    restored.load_state_dict(*json_round_trip(s.state_dict()))
    assert restored.model(3) is held  # a checkpoint of the round serves what the round served
    s.note_own(4, samples=10)
    s.note_peers([update("a", 4, 1.0), update("b", 4, 2.0)], current_round=4)  # c not heard this round
    assert s.model(4) is not held
    assert served(s, 4) == pytest.approx([(7.0 + 1.0 + 2.0 + 3.0) / 4] * 3)
    s.note_own(5, samples=10)
    s.note_peers([update("a", 5, 1.0), update("b", 5, 2.0), update("c", 5, 3.0)], current_round=5, clean=False)
    assert s.model(5) is not held  # a clipped update: the held model may carry what the mean leaves out
