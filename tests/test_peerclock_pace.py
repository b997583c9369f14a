"""Pacing (`PeerClock.lagging`): a node waits for partners that are behind it, not for those that only send to it
now and then."""

from __future__ import annotations

from quinkgl_cli.node.peerclock import PeerClock


def test_a_partner_in_step_that_sends_to_us_every_third_round_is_not_waited_for() -> None:
    # Our rounds last 1 s. "sparse" keeps step with us but its topology picks us every third round (a sparse
    # topology); "slow" sends every round of its own, and its rounds last 2 s.
    now = [0.0]
    clock = PeerClock(max_staleness=2, clock=lambda: now[0])
    for our_round in range(1, 13):
        now[0] = float(our_round)
        if our_round % 3 == 0:
            clock.note_arrival("sparse", our_round, our_round)
        if our_round % 2 == 0:
            clock.note_arrival("slow", our_round // 2, our_round)
        lagging = clock.lagging(["sparse", "slow"], our_round, our_round)  # before our next round
        # its newest round to us is up to two rounds old, but by its pace it has reached ours
        assert "sparse" not in lagging, our_round
    assert lagging["slow"] == 13 - 6  # round 13 begins; the slow partner sent its round 6 just now
