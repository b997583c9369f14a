"""The receiver-side rules both transports share (`transport.common`)."""

from __future__ import annotations

import logging

from quinkgl_cli.events import FIELDS_ATTR
from quinkgl_cli.transport.base import TransportStats
from quinkgl_cli.transport.common import DropLog, OfferBook


def test_offer_book_ignores_duplicates_and_older_rounds():
    book = OfferBook(remember=2)
    assert book.verdict("a", 5, b"k1") is None
    book.take("a", 5, b"k1")
    assert book.verdict("a", 5, b"k1") == "duplicate"
    assert book.verdict("a", 5, b"k2") is None  # another update of the same round: a second gossip step
    assert book.verdict("a", 4, b"k3") == "out_of_date"
    assert book.verdict("b", 5, b"k1") is None  # per sender
    book.take("a", 6, b"k2")
    book.take("a", 6, b"k3")
    assert book.verdict("a", 6, b"k3") == "duplicate"
    book.forget("a")  # lost and back (restarted from a checkpoint): starts afresh
    assert book.verdict("a", 1, b"k3") is None


def test_drops_are_counted_and_logged_once_with_the_node_as_context_not_as_a_field(caplog):
    stats = TransportStats()
    drops = DropLog(stats, "me")
    with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
        drops("fetch-failed", "peer-2", "timeout", offer_round=3)
        drops("fetch-failed", "peer-2", "timeout", offer_round=4)
    assert stats.dropped == 2
    first, repeat = [r for r in caplog.records if r.getMessage().startswith("fetch-failed")]
    assert first.levelno == logging.WARNING and repeat.levelno == logging.DEBUG
    assert first.node == "me" and getattr(first, FIELDS_ATTR) == {"peer": "peer-2", "reason": "timeout", "offer_round": 3}
    assert first.getMessage() == "fetch-failed peer=peer-2 reason=timeout offer_round=3"  # node and round once, by the line
    assert getattr(repeat, FIELDS_ATTR)["repeat"] == 2
