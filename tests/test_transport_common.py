"""The receiver-side rules both transports share (`transport.common`)."""

from __future__ import annotations

from quinkgl_cli.transport.common import OfferBook


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
