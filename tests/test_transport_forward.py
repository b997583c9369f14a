"""Control messages through a relay volunteer (`transport.ipv8.forward`), on loopback in one process: two peers
whose datagrams to each other are dropped (as between a symmetric NAT and a port-restricted one) meet through the
relay, exchange messages and models; the relay cannot alter or replay what it carries, and passes on only what its
bounds allow. (The NAT lab's `daemons` scenario runs the same through real NATs.)"""

from __future__ import annotations

import logging
from typing import Any

from quinkgl_cli.transport.ipv8.payloads import ControlPayload, ForwardedPayload
from quinkgl_cli.transport.ipv8.settings import ForwardLimits, Limits, RelayLimits
from tests.test_transport_contract import Cluster, _upd, run_cluster, wait_until


def _cut(t: Any, blocked: set[tuple[str, int]]) -> None:
    """``t`` behind a NAT that drops every datagram it sends to ``blocked`` (filled in as peers start)."""
    endpoint = t.parts.endpoint
    send = endpoint.send
    endpoint.send = lambda address, packet: None if tuple(address) in blocked else send(address, packet)
    t.parts.services.behind_nat = lambda: True


async def _apart(c: Cluster, relay: RelayLimits | None = None, blocked: set[tuple[str, int]] | None = None
                 ) -> tuple[Any, Any, Any, Any]:
    """A relay ``r`` and two peers ``a`` and ``b`` that cannot send each other a datagram (while ``blocked``)."""
    limits = Limits(forward=ForwardLimits(introduce_after=0.2), relay=relay or RelayLimits())
    r, _ = await c.add("r", relay=True, limits=limits)
    blocked = set() if blocked is None else blocked
    a, _ = await c.add("a", limits=limits)
    _cut(a, blocked)
    b, rb = await c.add("b", limits=limits)
    _cut(b, blocked)
    blocked.update({a.address, b.address})
    return r, a, b, rb


def test_peers_that_cannot_reach_each_other_meet_and_talk_through_a_relay(tmp_path) -> None:
    blocked: set[tuple[str, int]] = set()

    async def body(c: Cluster) -> None:
        r, a, b, rb = await _apart(c, blocked=blocked)
        await c.meet(["r", "a", "b"], timeout=15)
        assert a.parts.table.get("b").via == "r" and b.parts.table.get("a").via == "r"
        assert r.parts.table.get("a").via is None  # the relay itself is met directly
        a.send_message("b", "ping", {"n": 1})
        await wait_until(lambda: rb.messages, what="the relayed message")
        assert rb.messages == [("a", "ping", {"n": 1})]
        a.send_model("b", _upd(round_=3))  # its offer travels through the relay, its bytes over TCP
        await wait_until(lambda: rb.models, what="the model offered through the relay")
        assert rb.models[0].sender == "a" and rb.models[0].round == 3
        assert r.parts.forwarder.forwarded >= 4  # hellos both ways, the message, the offer
        assert a.parts.table.get("b").via == "r"  # still cut: nothing went straight
        blocked.clear()  # the NATs open a way: their hellos straight to each other find it, the relay steps aside
        await wait_until(lambda: a.parts.table.get("b").via is None and b.parts.table.get("a").via is None, 6,
                         "the peers to go direct")
        await r.stop()  # no relay any more: what they say now goes straight
        a.send_message("b", "ping", {"n": 2})
        await wait_until(lambda: len(rb.messages) == 2, what="the direct message")

    run_cluster("ipv8", tmp_path, body)


def test_a_relay_cannot_alter_or_replay_what_it_carries(tmp_path, caplog) -> None:
    async def body(c: Cluster) -> None:
        r, a, b, rb = await _apart(c)
        await c.meet(["r", "a", "b"], timeout=15)
        packet = a.parts.community.pack_signed(ControlPayload(a.swarm_id, *a.parts.courier.stamp(), "b", "ping", b'{"n":2}'))
        tampered = packet.replace(b'{"n":2}', b'{"n":9}')
        seen = r.parts.table.get("a").address

        def forward(data: bytes) -> None:
            r.parts.courier.send(r.parts.table.get("b").address,
                                 ForwardedPayload(r.swarm_id, *r.parts.courier.stamp(), "a", seen[0], seen[1], data))

        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            forward(tampered)
            forward(packet)
            await wait_until(lambda: rb.messages, what="the genuine message")
            forward(packet)  # the same packet again
            await wait_until(lambda: "reason=replay" in caplog.text, what="the replay refused")
        assert rb.messages == [("a", "ping", {"n": 2})]
        assert "reason=bad_signature" in caplog.text

    run_cluster("ipv8", tmp_path, body)


def test_a_relay_passes_on_only_what_its_bounds_allow(tmp_path, caplog) -> None:
    async def body(c: Cluster) -> None:
        r, a, b, rb = await _apart(c, RelayLimits(messages=2.0))
        await c.meet(["r", "a", "b"], timeout=15)
        rb.messages.clear()
        before = r.parts.forwarder.forwarded
        relay_at = a.parts.table.get("r").address
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
            for n in range(12):
                a.parts.courier.send_relayed(relay_at, "b", ControlPayload(a.swarm_id, *a.parts.courier.stamp(), "b",
                                                                           "ping", b'{"n":%d}' % n))
            await wait_until(lambda: "relay-refused peer=a reason=rate_limited" in caplog.text, what="the rate limit")
        assert r.parts.forwarder.forwarded - before <= 8  # a burst of twice the rate, and what refilled meanwhile
        with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):  # a target it does not know: nothing
            a.parts.courier.send_relayed(relay_at, "nobody", ControlPayload(a.swarm_id, *a.parts.courier.stamp(), "x", "ping", b"{}"))
            await wait_until(lambda: "reason=unknown_target" in caplog.text, what="an unknown target refused")

    run_cluster("ipv8", tmp_path, body)
