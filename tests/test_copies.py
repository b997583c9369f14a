"""The copy guard's memory of digests (`quinkgl_cli.node.copies`)."""

from quinkgl_cli.node.copies import CopyGuard, digest


def test_a_digest_remembered_late_for_an_old_round_is_forgotten_at_the_next_prune() -> None:
    guard = CopyGuard(window=2)
    assert guard.refusal("a", 5, b"new") is None
    guard.prune(5)
    assert guard.refusal("b", 1, b"old") is None  # an update of round 1 arriving in round 5
    guard.prune(5)  # round 1 is outside the window: its digest goes, although the round did not move
    assert guard.refusal("c", 5, b"old") is None
    assert guard.refusal("d", 5, b"new") == "copy of a's round-5 model"


def test_own_updates_are_forgotten_once_outside_the_window() -> None:
    guard = CopyGuard(window=1)
    guard.note_own(3, b"payload")
    guard.prune(4)
    assert guard.refusal("a", 4, digest(b"payload")) == "echo of this node's round-3 model"
    guard.prune(5)
    assert guard.refusal("a", 5, digest(b"payload")) is None
