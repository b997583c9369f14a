"""A stopping IPv8 transport lets its peers fetch what it offered them last (a daemon's final exchange is offered
just before it stops), instead of leaving them a fetch-failed / connection_refused warning."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.test_transport_contract import Cluster, _upd, run_cluster, wait_until


def test_ipv8_stop_serves_the_last_offers_first(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def body(c: Cluster) -> None:
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        await c.meet(["a", "b"])
        # b takes a moment before it fetches (as a busy peer does), so the offer is still open when a stops.
        fetcher = b.parts.fetcher  # type: ignore[attr-defined]
        fetch = fetcher.fetch

        async def late_fetch(*args: Any) -> None:
            await asyncio.sleep(0.3)
            await fetch(*args)

        fetcher.fetch = late_fetch
        a.send_model("b", _upd(round_=3, payload=payload))
        await wait_until(lambda: bool(a.parts.outbox.offers), what="the offer")  # type: ignore[attr-defined]
        await a.stop()
        await wait_until(lambda: bool(rb.models), what="the model offered before the stop")
        assert bytes(rb.models[0].payload) == payload

    with caplog.at_level(logging.WARNING, logger="quinkgl"):
        run_cluster("ipv8", tmp_path, body)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_ipv8_stop_does_not_wait_for_a_peer_that_is_gone(tmp_path) -> None:
    import time

    async def body(c: Cluster) -> None:
        a, _ = await c.add("a")
        b, _rb = await c.add("b")
        await c.meet(["a", "b"])
        await b.stop()  # says goodbye: a drops it from its table
        await wait_until(lambda: not a.peers(), what="b to leave")
        a.send_model("b", _upd(round_=1))
        began = time.monotonic()
        await a.stop()
        assert time.monotonic() - began < 1.0

    run_cluster("ipv8", tmp_path, body)
