"""A sender's busy reply (`busy`): what a recipient takes from it (only for an offer it is fetching from that
sender by that way, from that sender's key, its hint clamped), the per-requester bound on replies, and both ends
of the TCP ways' path requests (`links`): a sender whose push slots are full says so, and the recipient's attempt
ends at once without the way being remembered as failed. The UDP way's are in `test_udp_transfer.py`; the
fetcher's retries in `test_fetch_race.py`. No network: a courier that hands messages over in the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from quinkgl_cli.transport.base import TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.busy import (
    JITTER,
    MAX_RETRY,
    MIN_RETRY,
    REPLY_BURST,
    RETRY_MS,
    BusyReplies,
    SenderBusy,
    wait_before_asking,
)
from quinkgl_cli.transport.ipv8.links import Links
from quinkgl_cli.transport.ipv8.paths import DIRECT, REVERSE, UDP, Route
from quinkgl_cli.transport.ipv8.payloads import BusyPayload, PathRequestPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.settings import Limits, TransportSettings
from tests.test_transport_contract import Cluster, run_cluster

DEADLINE = 5.0  # seconds an exchange may take here before the test calls it hung
OFFER = b"o" * 20
log = logging.getLogger("test.busy")


class Courier:
    """Records what is sent; ``answer`` may answer it in the event loop, as the other end would."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.answer: Any = None

    def stamp(self) -> tuple[int, int]:
        return 1, len(self.sent) + 1

    def send(self, address: tuple[str, int], payload: Any) -> None:
        self.sent.append(payload)
        if self.answer is not None:
            asyncio.get_running_loop().call_soon(self.answer, payload)


def _record(name: str, key: bytes | None = None) -> PeerRecord:
    return PeerRecord(name, key or f"key-{name}".encode(), b"m" * 20, ("127.0.0.1", 7000), 7001, 0.0, 1)


def _settings(tmp_path: Path, **limits: Any) -> TransportSettings:
    return TransportSettings("me", "swarm", "arch", tmp_path, limits=Limits(**limits), connect_timeout=30.0)


def _busy(path: str = UDP, offer_id: bytes = OFFER, retry_ms: int = RETRY_MS, swarm: str = "swarm") -> BusyPayload:
    return BusyPayload(swarm, 1, 1, offer_id, path, retry_ms)


def test_a_busy_reply_counts_only_for_a_way_we_wait_on_from_that_senders_key_and_its_hint_is_clamped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        stats = TransportStats()
        replies = BusyReplies(_settings(tmp_path), Courier(), DropLog(stats, "me", log))  # type: ignore[arg-type]
        sender = _record("a")
        replies.on_busy(sender, _busy())  # nothing asked yet
        with replies.watch(sender, OFFER, UDP) as told:
            replies.on_busy(_record("c"), _busy())  # another peer
            replies.on_busy(_record("a", b"another key"), _busy())  # the sender's name, another key
            replies.on_busy(sender, _busy(offer_id=b"u" * 20))  # another offer
            replies.on_busy(sender, _busy(path=REVERSE))  # another way
            replies.on_busy(sender, _busy(swarm="other"))
            assert not told.done() and stats.dropped == 6
            with caplog.at_level(logging.INFO, logger="quinkgl.transport"):
                replies.on_busy(sender, _busy(retry_ms=10**9))
            assert told.result() == MAX_RETRY
            assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetch-busy")] == [
                f"fetch-busy peer=a path=udp retry_ms={int(MAX_RETRY * 1000)}"]
        with replies.watch(sender, OFFER, UDP) as told:
            replies.on_busy(sender, _busy(retry_ms=0))
            assert told.result() == MIN_RETRY
        replies.on_busy(sender, _busy())  # the reply to a repeated request, the attempt over: changes nothing
        replies.on_busy(sender, _busy(offer_id=b"u" * 20))  # for no attempt of ours
        assert stats.dropped == 7
    asyncio.run(run())


def test_busy_replies_to_one_requester_are_rate_limited(tmp_path: Path) -> None:
    async def run() -> None:
        courier = Courier()
        replies = BusyReplies(_settings(tmp_path), courier, DropLog(TransportStats(), "me", log))  # type: ignore[arg-type]
        for _ in range(50):
            replies.reply(_record("b"), OFFER, UDP)
        replies.reply(_record("c"), OFFER, UDP)
        assert [p.offer_id for p in courier.sent] == [OFFER] * (REPLY_BURST + 1)
        assert all(isinstance(p, BusyPayload) and p.retry_ms == RETRY_MS and p.path == UDP for p in courier.sent)
    asyncio.run(run())


class LinksEnd:
    """One end's `Links`, its other parts stand-ins: the offers it holds, its push slots, its courier."""

    def __init__(self, tmp_path: Path, **limits: Any) -> None:
        self.courier = Courier()
        self.stats = TransportStats()
        drops = DropLog(self.stats, "me", log)
        settings = _settings(tmp_path, **limits)
        self.busy = BusyReplies(settings, self.courier, drops)  # type: ignore[arg-type]
        self.outbox = SimpleNamespace(offers={})
        services = SimpleNamespace(behind_nat=lambda: False, relay_candidates=lambda node: [], relay_address=lambda r: None)
        self.links = Links(settings, self.courier, services, None, self.outbox, SimpleNamespace(port=7100),  # type: ignore[arg-type]
                           SimpleNamespace(allows=lambda host: True), TaskRegistry(asyncio.get_running_loop(), "me"),  # type: ignore[arg-type]
                           drops, None, self.busy)  # type: ignore[arg-type]


def test_a_sender_with_every_push_slot_taken_answers_a_path_request_busy(tmp_path: Path) -> None:
    async def run() -> None:
        end = LinksEnd(tmp_path, serve_slots=1)
        end.outbox.offers[OFFER] = SimpleNamespace(recipient="b", serving=False)
        end.links.pushing.add(b"p" * 20)  # the one slot: another offer on its way
        end.links.on_path_request(_record("b"), PathRequestPayload("swarm", 1, 1, OFFER, REVERSE, "", 7000))
        assert [(p.offer_id, p.path) for p in end.courier.sent] == [(OFFER, REVERSE)]
        end.links.pushing.add(OFFER)  # a repeated request for an offer on its way is no busy one
        end.links.on_path_request(_record("b"), PathRequestPayload("swarm", 1, 1, OFFER, REVERSE, "", 7000))
        assert len(end.courier.sent) == 1
    asyncio.run(run())


def test_a_path_request_answered_busy_ends_at_once_and_the_way_is_not_failed(tmp_path: Path) -> None:
    async def run() -> None:
        end = LinksEnd(tmp_path)
        sender = _record("a")
        end.courier.answer = lambda p: end.busy.on_busy(sender, _busy(REVERSE, p.offer_id, 10))
        offer = SimpleNamespace(offer_id=OFFER, tcp_port=7000)
        with pytest.raises(SenderBusy) as told:
            await asyncio.wait_for(end.links.connect_any(sender, offer, [Route(REVERSE)]), DEADLINE)  # type: ignore[arg-type]
        assert told.value.retry == MIN_RETRY and told.value.path == REVERSE
        assert [type(p) for p in end.courier.sent] == [PathRequestPayload]  # asked once, not until connect_timeout
        assert end.links.book.routes("a", time.monotonic(), [], reverse=True) == [Route(DIRECT), Route(REVERSE)]
        assert end.links.waiting == {}
    asyncio.run(run())


def test_a_busy_reply_crosses_between_real_transports(tmp_path: Path) -> None:
    """The wiring: signed and sealed by one transport's courier, checked and routed by the other's community."""
    async def body(c: Cluster) -> None:
        a, _ = await c.add("a")
        b, _ = await c.add("b")
        await c.meet(["a", "b"])
        with b.parts.links.busy.watch(b.parts.table.get("a"), OFFER, UDP) as told:
            a.parts.links.busy.reply(a.parts.table.get("b"), OFFER, UDP)
            await asyncio.wait_for(told, DEADLINE)
        assert told.result() == RETRY_MS / 1000

    run_cluster("ipv8", tmp_path, body)


def test_recipients_turned_away_together_do_not_all_ask_again_together() -> None:
    """Each wait is the hint and at most JITTER of it more, drawn apart: 50 recipients told 1 s spread over most of
    the half second (a constant wait puts them all in one instant)."""
    waits = [wait_before_asking(1.0) for _ in range(50)]
    assert all(1.0 <= w <= 1.0 + JITTER for w in waits)
    assert max(waits) - min(waits) > JITTER / 2
