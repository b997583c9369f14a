"""Signed datagrams captured and sent again: refused, from wherever they come, and a restarted peer still accepted.

IPv8 only checks who signed a packet; the transport's session and counter (`transport.ipv8.replay`) decide whether
it was seen before. Real transports on 127.0.0.1; the "attacker" is another loopback UDP socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest

from quinkgl_cli.errors import IOFailure
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.transport.base import OutgoingUpdate
from quinkgl_cli.transport.ipv8 import identity
from quinkgl_cli.transport.ipv8.replay import WINDOW, ReplayGuard
from quinkgl_cli.transport.ipv8.seal import DatagramSeal
from tests.test_transport_contract import Cluster, Recorder, _ipv8, run_cluster, wait_until

HELLO, OFFER, CONTROL, BYE = 1, 2, 3, 4
SWARM = "sha256:" + "ab" * 32  # `_ipv8`'s


def capture(t) -> list[tuple[tuple[str, int], bytes]]:
    """Every datagram ``t`` sends from now on, with its destination."""
    sent: list[tuple[tuple[str, int], bytes]] = []
    original = t.parts.endpoint.send

    def spy(address, packet):
        sent.append(((str(address[0]), int(address[1])), bytes(packet)))
        original(address, packet)

    t.parts.endpoint.send = spy
    return sent


def of_kind(sent, msg_id: int, to: tuple[str, int]) -> list[bytes]:
    return [p for addr, p in sent if addr == to and len(p) > 22 and p[22] == msg_id]


def warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage() and r.levelno >= logging.WARNING]


class Attacker:
    """A loopback UDP socket of someone holding the swarm key (a member, or whoever captured its datagrams and the
    key): what it sends is sealed (`seal`), so the checks behind the seal are what these tests reach."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.seal = DatagramSeal(swarmkey.for_swarm_id(SWARM))

    def sendto(self, packet: bytes, address: tuple[str, int]) -> None:
        self.sock.sendto(self.seal.seal(packet), address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def attacker() -> Attacker:
    return Attacker()


def test_replayed_hello_and_control_from_another_socket_are_dropped(tmp_path, caplog):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, _ = await c.add("b")
        sent = capture(b)
        await c.meet(["a", "b"])
        b.send_message("a", "ping", {"n": 1})
        await wait_until(lambda: ra.messages, what="the genuine message")
        await wait_until(lambda: of_kind(sent, HELLO, a.address), what="a hello of b's to a")
        hello = of_kind(sent, HELLO, a.address)[-1]
        (control,) = of_kind(sent, CONTROL, a.address)
        sock = attacker()
        try:
            with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
                dropped = a.stats.dropped
                for _ in range(3):
                    sock.sendto(hello, a.address)
                    sock.sendto(control, a.address)
                await wait_until(lambda: a.stats.dropped == dropped + 6, what="six replays dropped")
            with pytest.raises(BlockingIOError):
                sock.recv(65536)  # a replayed hello asking for a reply got none
        finally:
            sock.close()
        assert ra.messages == [("b", "ping", {"n": 1})]  # one delivery, not four
        (peer,) = a.peers()
        assert peer.address == b.address  # not the attacker's
        assert ra.discovered == ["b"] and ra.lost == []
        assert len(warnings(caplog, "peer-refused peer=b reason=replay")) == 1
        assert len(warnings(caplog, "message-refused peer=b reason=replay")) == 1
        b.send_message("a", "ping", {"n": 2})  # b's own traffic goes on
        await wait_until(lambda: len(ra.messages) == 2, what="the next genuine message")

    run_cluster("ipv8", tmp_path, body)


def test_replayed_offer_is_not_fetched_twice(tmp_path, caplog):
    async def body(c: Cluster):
        a, _ = await c.add("a")
        b, rb = await c.add("b")
        sent = capture(a)
        await c.meet(["a", "b"])
        a.send_model("b", OutgoingUpdate(round=1, payload=b"weights", sample_count=1))
        await wait_until(lambda: rb.models, what="the model")
        (offer,) = of_kind(sent, OFFER, b.address)
        sock = attacker()
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                sock.sendto(offer, b.address)
                sock.sendto(offer, b.address)
                await wait_until(lambda: warnings(caplog, "offer-refused peer=a reason=replay"), what="the replay refused")
        finally:
            sock.close()
        assert len(rb.models) == 1 and a.stats.models_sent == 1
        assert len(warnings(caplog, "reason=replay")) == 1

    run_cluster("ipv8", tmp_path, body)


def test_old_session_hello_after_a_restart_changes_nothing(tmp_path, caplog):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, _ = await c.add("b")
        sent = capture(b)
        await c.meet(["a", "b"])
        await wait_until(lambda: of_kind(sent, HELLO, a.address), what="a hello of b's first run")
        old_hellos = of_kind(sent, HELLO, a.address)
        first_session = b.parts.courier.session
        b.running = False  # a crash: no goodbye
        await b._teardown()
        again = _ipv8(tmp_path, "b", bootstrap=[a.address], silence_timeout=3.0)
        c.nodes["b"] = (again, Recorder())
        await again.start(c.nodes["b"][1])
        assert again.parts.courier.session > first_session
        await wait_until(lambda: ra.discovered == ["b", "b"], what="the restarted peer accepted")
        assert ra.lost == ["b"]
        sock = attacker()
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                dropped = a.stats.dropped
                for packet in old_hellos:
                    sock.sendto(packet, a.address)
                await wait_until(lambda: a.stats.dropped == dropped + len(old_hellos), what="old hellos dropped")
        finally:
            sock.close()
        assert ra.lost == ["b"] and ra.discovered == ["b", "b"]  # no lost/rediscovered cycle
        (peer,) = a.peers()
        assert peer.address == again.address
        assert len(warnings(caplog, "peer-refused peer=b reason=replay")) == 1
        again.send_message("a", "hi", {})
        await wait_until(lambda: ra.messages == [("b", "hi", {})], what="the new run's message")

    run_cluster("ipv8", tmp_path, body)


def test_replayed_goodbye_does_not_drop_the_restarted_peer(tmp_path, caplog):
    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, _ = await c.add("b")
        sent = capture(b)
        await c.meet(["a", "b"])
        await b.stop()
        (bye,) = of_kind(sent, BYE, a.address)
        await wait_until(lambda: ra.lost == ["b"], what="the goodbye")
        again = _ipv8(tmp_path, "b", bootstrap=[a.address])
        c.nodes["b"] = (again, Recorder())
        await again.start(c.nodes["b"][1])
        await wait_until(lambda: ra.discovered == ["b", "b"], what="the restarted peer")
        sock = attacker()
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                dropped = a.stats.dropped
                sock.sendto(bye, a.address)
                await wait_until(lambda: a.stats.dropped == dropped + 1, what="the old goodbye dropped")
        finally:
            sock.close()
        assert ra.lost == ["b"] and [p.node_id for p in a.peers()] == ["b"]
        assert len(warnings(caplog, "bye-refused peer=b reason=replay")) == 1

    run_cluster("ipv8", tmp_path, body)


def test_peer_of_another_protocol_version_is_refused_as_such(tmp_path, caplog):
    """A version-1 hello (no session or counter) is read far enough to name the mismatch, not called malformed."""
    from ipv8.messaging.lazy_payload import VariablePayload, vp_compile

    @vp_compile
    class HelloV1(VariablePayload):
        msg_id = 1
        format_list = ["varlenHutf8", "varlenHutf8", "varlenHutf8", "H", "H", "Q", "?"]
        names = ["swarm_id", "node_id", "arch_hash", "protocol", "tcp_port", "session", "want_reply"]

    async def body(c: Cluster):
        with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
            a, ra = await c.add("a")
            old = _ipv8(tmp_path, "old", bootstrap=[a.address], protocol_version=1)
            await old.start(Recorder())
            c.nodes["old"] = (old, Recorder())
            for _ in range(3):
                old.parts.community.send_signed(a.address, HelloV1(a.swarm_id, "old", a.arch_hash, 1, old.tcp_port, 7, True))
            await wait_until(lambda: warnings(caplog, "peer=old reason=protocol_mismatch"), what="mismatch logged")
            await asyncio.sleep(0.5)  # several walks and heartbeats of the old peer: still one line
        assert len(warnings(caplog, "peer-refused peer=old reason=protocol_mismatch")) == 1
        assert not warnings(caplog, "reason=malformed")
        assert ra.discovered == [] and not a.peers()

    run_cluster("ipv8", tmp_path, body)


# -- the rules themselves ---------------------------------------------------------------------------------------------
def test_replay_guard_admits_each_message_once():
    g = ReplayGuard()
    k = b"key"
    assert g.admit(k, 10, 5)
    assert not g.admit(k, 10, 5)
    assert g.admit(k, 10, 7) and g.admit(k, 10, 6)  # overtaken datagrams get in, once
    assert not g.admit(k, 10, 6) and not g.admit(k, 10, 7)
    assert g.admit(k, 10, 7 + WINDOW)
    assert not g.admit(k, 10, 7)  # older than the window: cannot tell, so refused
    assert not g.admit(k, 9, 10_000)  # an earlier run's message
    assert g.admit(k, 11, 1)  # a restart
    assert not g.admit(k, 10, 10_000)
    assert g.admit(b"other", 1, 1)  # per sender


def test_replay_guard_forgets_the_least_recently_heard_beyond_capacity():
    g = ReplayGuard(capacity=2)
    assert g.admit(b"a", 1, 1) and g.admit(b"b", 1, 1)
    assert g.admit(b"a", 1, 2)  # a is heard again: b is now the oldest
    assert g.admit(b"c", 1, 1)
    assert not g.admit(b"a", 1, 2)
    assert g.admit(b"b", 1, 1)  # forgotten, so admitted again


def test_session_grows_on_every_start_even_when_the_clock_goes_back(tmp_path, monkeypatch):
    first = identity.next_session(tmp_path)
    second = identity.next_session(tmp_path)
    assert second > first
    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000)  # the clock jumped back decades
    assert identity.next_session(tmp_path) == second + 1
    assert (tmp_path / identity.SESSION_FILE).stat().st_mode & 0o077 == 0


def test_corrupt_session_file_is_a_one_line_error(tmp_path):
    (tmp_path / identity.SESSION_FILE).write_text("not a number\n")
    with pytest.raises(IOFailure, match="corrupt"):
        identity.next_session(tmp_path)


# -- signatures -------------------------------------------------------------------------------------------------------
def test_packets_with_a_bad_signature_are_dropped_and_logged_once(tmp_path, caplog):
    """Well-formed hello and control packets of b's, never delivered, made invalid: one flipped signature byte, or
    b's signature under another key's name. Without the check they would be fresh and accepted."""

    async def body(c: Cluster):
        a, ra = await c.add("a")
        b, _ = await c.add("b")
        other, _ = await c.add("c")
        await c.meet(["a", "b", "c"])
        held: list[bytes] = []
        original = b.parts.endpoint.send

        def withhold(address, packet):  # b's next hello and control to a are kept here, not sent
            if tuple(address) == a.address and packet[22] in (HELLO, CONTROL) and len(held) < 2:
                held.append(bytes(packet))
                return
            original(address, packet)

        b.parts.endpoint.send = withhold
        b.send_message("a", "secret", {"n": 1})
        b.parts.membership.hello(a.parts.key.pub().key_to_bin(), a.address, want_reply=True, min_gap=0.0)
        b.parts.endpoint.send = original
        assert sorted(p[22] for p in held) == [HELLO, CONTROL]
        key_len = int.from_bytes(held[0][23:25], "big")
        assert held[0][25 : 25 + key_len] == b.parts.key.pub().key_to_bin()
        other_key = other.parts.key.pub().key_to_bin()
        assert len(other_key) == key_len
        forged = []
        for packet in held:
            flipped = bytearray(packet)
            flipped[-1] ^= 0x01
            forged.append(bytes(flipped))
            forged.append(packet[:25] + other_key + packet[25 + key_len :])  # b's signature, c's name
        sock = attacker()
        port = sock.getsockname()[1]
        try:
            with caplog.at_level(logging.DEBUG, logger="quinkgl.transport"):
                dropped = a.stats.dropped
                for packet in forged:
                    sock.sendto(packet, a.address)
                await wait_until(lambda: a.stats.dropped == dropped + len(forged), what="forged packets dropped")
        finally:
            sock.close()
        assert ra.messages == []
        assert {p.node_id: p.address for p in a.peers()} == {"b": b.address, "c": other.address}
        lines = warnings(caplog, "reason=bad_signature")
        assert len(lines) == 1 and lines[0].startswith(f"packet-refused peer=127.0.0.1:{port} reason=bad_signature"), lines
        assert not warnings(caplog, "reason=malformed") and not warnings(caplog, "reason=replay")
        for packet in held:  # the genuine packets are still good: they were never seen
            original(a.address, packet)
        await wait_until(lambda: ra.messages == [("b", "secret", {"n": 1})], what="the genuine message")

    run_cluster("ipv8", tmp_path, body)
