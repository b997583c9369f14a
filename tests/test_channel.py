"""The model channel's confidentiality (issue 12 item 7): what a relay on the TCP path sees and can do.

The sender announces a relay's port in its offers, so every fetch passes through a TCP relay we control: it
records the bytes, and may flip one or rewrite the channel version on the way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import pytest

from quinkgl_cli.transport.ipv8 import channel, stream
from tests.test_transport_contract import Cluster, _upd, run_cluster, wait_until

SECRET = b"secret weights, readable by the recipient only " * 2000  # ~94 KB: the small-payload path
LARGE = os.urandom(600_000)  # above the threaded threshold: several frames


class Relay:
    """Forwards one TCP hop to ``target``, keeping what passed in each direction; ``edit`` may change a chunk."""

    def __init__(self, target: int, edit: Callable[[str, int, bytes], bytes] | None = None) -> None:
        self.target = target
        self.edit = edit or (lambda direction, offset, data: data)
        self.seen = {"down": bytearray(), "up": bytearray()}
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(src, dst, direction):
            try:
                while data := await src.read(65536):
                    offset = len(self.seen[direction])
                    self.seen[direction] += data
                    dst.write(self.edit(direction, offset, data))
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(up_reader, writer, "down"), pump(reader, up_writer, "up"))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _through_relay(c: Cluster, edit=None):
    a, _ = await c.add("a")
    b, rb = await c.add("b")
    await c.meet(["a", "b"])
    relay = Relay(a.tcp_port, edit)
    a.parts.outbox.tcp_port = await relay.start()  # a's offers now point at the relay
    return a, b, rb, relay


@pytest.mark.parametrize("payload", [SECRET, LARGE], ids=["small", "large"])
def test_an_eavesdropper_on_the_tcp_path_sees_no_model_bytes(tmp_path, payload):
    async def body(c: Cluster):
        a, _b, rb, relay = await _through_relay(c)
        try:
            a.send_model("b", _upd(round_=1, payload=payload))
            await wait_until(lambda: rb.models, what="the model through the relay")
        finally:
            relay.close()
        assert bytes(rb.models[0].payload) == payload
        down = bytes(relay.seen["down"])
        assert len(down) >= channel.sealed_size(len(payload))  # the model did pass the relay...
        probe = payload[1000:1032]
        assert probe not in down and probe not in bytes(relay.seen["up"])  # ...and none of it in clear

    run_cluster("ipv8", tmp_path, body)


def test_a_flipped_ciphertext_byte_fails_the_fetch(tmp_path, caplog):
    header = stream.CHALLENGE.size + stream.RESPONSE.size

    def flip(direction, offset, data):
        at = header + 5000 - offset  # a byte inside the first frame
        if direction != "down" or not 0 <= at < len(data):
            return data
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

    async def body(c: Cluster):
        a, _b, rb, relay = await _through_relay(c, flip)
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                a.send_model("b", _upd(round_=1, payload=SECRET))
                await wait_until(lambda: "reason=bad_frame" in caplog.text, what="the altered frame refused")
        finally:
            relay.close()
        assert not rb.models

    run_cluster("ipv8", tmp_path, body)


def test_a_downgraded_channel_version_is_refused_not_spoken(tmp_path, caplog):
    def downgrade(direction, offset, data):
        if direction == "down" and offset == 0 and len(data) > 4:
            return data[:4] + bytes([1]) + data[5:]  # the challenge's version byte: "cleartext, please"
        return data

    async def body(c: Cluster):
        a, _b, rb, relay = await _through_relay(c, downgrade)
        try:
            with caplog.at_level(logging.WARNING, logger="quinkgl.transport"):
                a.send_model("b", _upd(round_=1, payload=SECRET))
                await wait_until(lambda: "reason=channel_version" in caplog.text, what="the downgrade refused")
        finally:
            relay.close()
        assert not rb.models
        assert SECRET[:32] not in bytes(relay.seen["down"])

    run_cluster("ipv8", tmp_path, body)


def test_frames_open_only_in_order_with_the_same_key():
    key = os.urandom(32)
    frames = list(channel.Sealer(key).frames(LARGE))
    assert len(frames) == channel.frame_count(len(LARGE)) and sum(map(len, frames)) == channel.sealed_size(len(LARGE))
    assert bytes(channel.Opener(key).open_all(b"".join(frames), len(LARGE))) == LARGE
    with pytest.raises(channel.ChannelError, match="bad_frame"):
        channel.Opener(key).open(frames[1])  # out of order
    with pytest.raises(channel.ChannelError, match="bad_frame"):
        channel.Opener(os.urandom(32)).open(frames[0])
    a, b = channel.Ephemeral(), channel.Ephemeral()
    assert a.derive(b.public, b"s", b"ctx") == b.derive(a.public, b"s", b"ctx") != a.derive(b.public, b"s", b"other")
    with pytest.raises(channel.ChannelError, match="bad_key_exchange"):
        a.derive(b"\0" * 32, b"s", b"ctx")  # a low-order point
