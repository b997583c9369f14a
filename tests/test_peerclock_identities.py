"""The swarm clock against identities that cost nothing: the catch-up quorum counts only peers with a history
(valid updates in HISTORY_ROUNDS rounds of ours), a round claim past the round limit counts as none, and pacing
waits only for peers that have shown progress."""

from __future__ import annotations

import logging

import pytest
import torch

from quinkgl_cli.node.metrics import MET_NAMES, RoundRecorder
from quinkgl_cli.node.peerclock import HISTORY_ROUNDS, PACE_MUTE_ROUNDS, PeerClock
from quinkgl_cli.tensors import flatten
from quinkgl_cli.transport.base import PeerInfo
from quinkgl_cli.transport.memory import MemoryNetwork
from tests.test_node_core import forged, make_node, manifest


def test_fresh_keys_claiming_round_a_million_cannot_end_training(caplog: pytest.LogCaptureFixture) -> None:
    # The attack: three fresh keys sending copied models that claim round 1,000,000 made every peer jump to its
    # last round (9 of 12 rounds skipped). Here two honest peers keep step; the three copies are valid updates.
    net = MemoryNetwork(auto_deliver=False)
    me = make_node(net, "me", manifest(), 0, rounds=12)
    for name in ("h1", "h2", "s1", "s2", "s3"):
        make_node(net, name, manifest(), 1, seed=1, rounds=12)
    net.deliver_all()
    with caplog.at_level(logging.INFO, logger="quinkgl.node"):
        for expected in range(1, 13):
            assert me.begin_round() == expected
            copy = flatten(me.model)
            # Each a little apart, every round: byte-equal copies would be dropped on arrival (`node.copies`) and
            # this test is about the round clock.
            for k, honest in enumerate(("h1", "h2")):
                me.on_model(forged(me, honest, expected, copy + 1e-4 * (k + 8 * expected), 30))
            for k, sybil in enumerate(("s1", "s2", "s3"), start=2):
                me.on_model(forged(me, sybil, 1_000_000, copy + 1e-4 * (k + 8 * expected), 30))
            assert me.aggregate() is not None
            me.end_round()
    assert not [r for r in caplog.records if r.getMessage().startswith("caught-up")]
    assert me.completed_round == 12 and len(me.history) == 12


def test_without_a_round_limit_fresh_keys_still_wait_for_a_history() -> None:
    clock = PeerClock(max_staleness=1, clock=lambda: 0.0)
    known = ["h1", "s1", "s2", "s3"]
    for our_round in range(1, HISTORY_ROUNDS + 1):
        assert clock.catch_up(our_round, known, None) is None
        for sybil in ("s1", "s2", "s3"):
            clock.note_valid(sybil, 1_000_000, our_round)
        clock.note_valid("h1", our_round, our_round)
    # Three rounds of valid updates later they count; a majority of long-lived liars is beyond what a history can
    # tell apart (certified membership is), but it took them HISTORY_ROUNDS rounds of useful updates.
    assert clock.has_history("s1") and clock.catch_up(HISTORY_ROUNDS + 1, known, None) is not None
    # Many updates in one round are one round of history.
    fresh = PeerClock(max_staleness=1, clock=lambda: 0.0)
    for _ in range(10):
        fresh.note_valid("x", 5, 1)
    assert not fresh.has_history("x")


def test_identities_taking_turns_claiming_round_zero_cause_no_pacing() -> None:
    # The attack: five identities taking turns, each sending one update claiming round 0, stretched rounds from
    # 1 s to 11 s through pacing.
    now = [0.0]
    clock = PeerClock(max_staleness=1, clock=lambda: now[0])
    known = [f"turn{i}" for i in range(5)] + ["slow"]
    for our_round in range(1, 11):
        now[0] += 1.0
        turn = f"turn{our_round % 5}"
        clock.note_arrival(turn, 0, our_round)
        clock.note_valid(turn, 0, our_round)
        assert clock.lagging(known, our_round, our_round) == {}, our_round
    # Each identity had two turns claiming round 0: no progress shown, so none was ever waited for. A slow peer
    # whose rounds advance is, even when its updates arrive too late to be valid.
    for our_round in (11, 12):
        now[0] += 1.0
        clock.note_arrival("slow", our_round - 3, our_round)
    assert clock.lagging(known, 12, 12) == {"slow": 4}  # round 13 begins, its newest is 9


def test_a_history_comes_only_from_valid_updates() -> None:
    net = MemoryNetwork(auto_deliver=False)
    me = make_node(net, "me", manifest(), 0, rounds=20)
    d = flatten(me.model).numel()
    for _ in range(HISTORY_ROUNDS):
        me.begin_round()
        me.on_model(forged(me, "junk", me.round, torch.zeros(d), 30, payload=b"QGLT garbage"))
        me.aggregate()
        me.end_round()
    assert not me.peer_clock.has_history("junk")


def test_catch_up_counts_the_same_peers_whether_known_is_a_mapping_or_a_list() -> None:
    # A mapping of known peers is searched from the side of the peers with a history; the answer must not change,
    # including peers with a history that are no longer known (they do not count).
    clock = PeerClock(max_staleness=1, clock=lambda: 0.0)
    for our_round in range(1, HISTORY_ROUNDS + 1):
        for peer in ("a", "b", "c", "gone"):
            clock.note_valid(peer, 40, our_round)
    known = {p: None for p in ("a", "b", "c", "x", "y", "z", "w", "v")}
    as_list = clock.catch_up(HISTORY_ROUNDS + 1, list(known), None)
    assert clock.catch_up(HISTORY_ROUNDS + 1, known, None) == as_list
    assert as_list is not None and as_list.peers == 3
    few = {p: None for p in ("a", "b")}  # fewer known peers than peers with a history: the plain walk
    assert clock.catch_up(HISTORY_ROUNDS + 1, few, None) == clock.catch_up(HISTORY_ROUNDS + 1, ["a", "b"], None)


def test_identities_falling_behind_in_turn_buy_one_wait_per_mute_window() -> None:
    # The attack (`bench_attacks.py --scenarios pace-stretch`): fresh keys that show progress (a round period),
    # then fall behind one after another and never catch up. Muted one by one after its wait timed out, they took
    # turns: real daemons waited 3-11 s before every round from round 5 on (15 rounds of 1 s took 81 s).
    now = [0.0]
    clock = PeerClock(max_staleness=2, clock=lambda: now[0])
    known = [f"laggard{i}" for i in range(10)]
    for peer in known:  # two updates each: a round period of 3 s
        clock.note_arrival(peer, 1, 0)
        now[0] += 3.0
        clock.note_arrival(peer, 2, 0)
    waits = 0
    for our_round in range(1, 41):
        now[0] += 1.0
        laggard = known[our_round % len(known)]
        clock.note_arrival(laggard, 2 + our_round // 3, our_round)  # advancing, yet ever further behind
        plan = clock.pace_plan(clock.lagging(known, our_round, our_round), [1.0], 1.0)
        if plan is not None:
            waits += 1
            now[0] += plan.patience  # nobody catches up: the wait times out
            clock.forget_lagging(clock.lagging(known, our_round, our_round), our_round)
    assert waits <= 40 // PACE_MUTE_ROUNDS


def test_keys_that_come_and_go_leave_no_state_behind() -> None:
    # Keys cost nothing: one that joins, sends updates and leaves (evicted, silent, lost) must not leave state in the
    # node for good. Before, the swarm clock kept five entries per such key, the inbox one per drop it logged, and
    # the names met one per key, in memory and in every checkpoint (a checkpoint grew by 190 KB per 3,400 names).
    net = MemoryNetwork(auto_deliver=False)
    me = make_node(net, "me", manifest(max_staleness=1), 0, rounds=50)
    me.completed_round = 10
    me.begin_round()
    flat = flatten(me.model)
    for i in range(MET_NAMES + 50):
        peer = PeerInfo(f"fresh-{i}", f"{i:064x}", ("127.0.0.1", 1), 0.0)
        me.on_peer_discovered(peer)
        if i < 100:
            for claimed in (1, 2):  # stale: noted by the clock, dropped and logged by the inbox
                me.on_model(forged(me, peer.node_id, claimed, flat + 1e-3 * claimed, 30))
        me.on_peer_lost(peer)
    clock = me.peer_clock
    assert not (clock._peer_rounds or clock._lagging or clock._last_arrival or clock._round_period or clock._history)
    assert not me.inbox._drop_logged
    saved = me.recorder.state_dict()
    assert len(saved["known_peers"]) == MET_NAMES
    assert me.recorder.recorded()["peers_met"] == MET_NAMES + 50  # still counted
    restored = RoundRecorder()
    restored.load_state_dict(saved)
    assert restored.recorded()["peers_met"] == MET_NAMES + 50
