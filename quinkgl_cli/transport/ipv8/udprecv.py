"""The receiving end of a transfer over the punched UDP way: asking for it, the buffer, the acknowledgements.

`Receiving` is one transfer: the offered size's buffer, allocated once, and which chunks are in it. A chunk is
taken only from the sender's address, only once the keys are agreed, only for a chunk of the offered size inside
the window, and only when it opens under the transfer's key (decrypted straight into its place in the buffer); a
chunk already in hand is only answered with an acknowledgement (the sender may have missed ours). An acknowledgement goes every ``ACK_EVERY``
chunks (every other one while chunks are missing, so the sender learns of a gap fast), at the last chunk of each
burst the sender sends (PUSH: a small window is not left waiting), or ``ACK_DELAY`` seconds after a chunk that
none answered yet.

`UdpReceiver` asks for transfers (`fetch`: a signed `UdpPullPayload`, again every ``ASK_EVERY`` seconds until the
sender's START comes, for ``connect_timeout`` seconds at most), holds those under way, and keeps the ones that
ended well for ``LINGER`` seconds to acknowledge them again should the sender have missed the last
acknowledgement (and the ones that failed, to drop their stragglers quietly). `take` is asked first about every
datagram the endpoint receives: chunks are sealed under their transfer's key only (`udpwire`), so it tries the keys
of the transfers from the datagram's source address; one that none opens goes on to the swarm seal. A fetch ends with the bytes and their sha256, or `stream.FetchError`: ``sender_silent`` (no
START: the way does not work), ``sender_vanished`` (nothing heard for a stall window), ``stalled`` (too slow over
a stall window, as for TCP) or ``too_slow`` (the overall budget).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable

from quinkgl_cli.transport.ipv8 import stream, udpwire
from quinkgl_cli.transport.ipv8.channel import ChannelError, Ephemeral
from quinkgl_cli.transport.ipv8.outbox import HASH_IN_THREAD
from quinkgl_cli.transport.ipv8.udpsend import Wire
from quinkgl_cli.transport.ipv8.udpwire import CHUNK, WINDOW, TransferKeys, WireError

ACK_EVERY = 16  # a 32nd of the largest window: the sender hears often enough to keep it full
ACK_DELAY = 0.01
ASK_EVERY = 0.5
LINGER = 5.0  # seconds an ended transfer is still acknowledged
LINGER_KEPT = 64
_EMPTY = bytes(udpwire.BITMAP_BYTES)


class Receiving:
    def __init__(self, tid: bytes, address: tuple[str, int], size: int, ephemeral: Ephemeral, context: bytes,
                 wire: Wire) -> None:
        """``context``: what the keys are bound to besides both ephemeral keys (the swarm's community, the offer)."""
        self.tid = tid
        self.address = address
        self.size = size
        self.count = udpwire.chunks(size)
        self.buf = bytearray(size)
        self.view: memoryview | None = memoryview(self.buf)  # None once closed: nothing is written any more
        self.have = bytearray(self.count)
        self.cum = 0
        self.got = 0
        self.ephemeral: Ephemeral | None = ephemeral
        self.context = context
        self.wire = wire
        self.keys: TransferKeys | None = None
        self.unanswered = 0  # chunks taken since our last acknowledgement
        self.timer: asyncio.TimerHandle | None = None
        self.heard = time.monotonic()  # the last datagram that opened
        self.closed_at = float("inf")
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def complete(self) -> bool:
        return self.got >= self.count

    def on_start(self, packet: bytes) -> None:
        if self.keys is None:
            assert self.ephemeral is not None
            try:
                theirs = udpwire.start_key(packet)
                self.keys = TransferKeys.derive(self.ephemeral, theirs, self.context + theirs + self.ephemeral.public, self.tid)
            except ChannelError:
                raise WireError("bad_key_exchange") from None
            self.ephemeral = None  # forward secrecy: the private half goes as soon as the keys are made
            if not self.started.done():
                self.started.set_result(None)
        self.heard = time.monotonic()
        self.ack()  # also for a repeated START: our acknowledgement was lost

    def take(self, datagram: bytes) -> bool:
        """A chunk's datagram, if it opens under this transfer's key: True when it did (taken, acknowledged or, for
        a transfer that failed, dropped), False when it is not ours; WireError for one of ours out of place."""
        keys = self.keys
        tail = None if keys is None else udpwire.data_tail(datagram)
        if tail is None:
            return False
        assert keys is not None
        push, seq = tail
        start = seq * CHUNK
        end = min(start + CHUNK, self.size)
        if (self.view is not None and seq < self.count and seq < self.cum + WINDOW and not self.have[seq]
                and len(datagram) - udpwire.DATA_OVERHEAD == end - start):
            # A place no chunk filled yet: a datagram that does not open leaves garbage only there.
            if not keys.open_data_into(datagram, self.view[start:end]):
                return False
            self._took(seq, push)
            return True
        chunk = keys.open_data(datagram)
        if chunk is None:
            return False
        if self.view is None and not self.complete:
            return True  # a straggler of a transfer that failed
        if seq >= self.count or seq >= self.cum + WINDOW:
            raise WireError("out_of_window")
        if len(chunk) != end - start:
            raise WireError("wrong_length")
        self.heard = time.monotonic()
        self.ack()  # a chunk already in hand: the sender may have missed our acknowledgement
        return True

    def _took(self, seq: int, push: bool) -> None:
        self.heard = time.monotonic()
        self.have[seq] = 1
        self.got += 1
        gap = seq != self.cum
        while self.cum < self.count and self.have[self.cum]:
            self.cum += 1
        self.unanswered += 1
        if self.complete:
            self.ack()
            if not self.finished.done():
                self.finished.set_result(None)
        elif push or self.unanswered >= (2 if gap or self.cum < seq else ACK_EVERY):
            self.ack()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(ACK_DELAY, self.ack)

    def ack(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.keys is None:
            return
        self.unanswered = 0
        if self.got == self.cum:  # nothing beyond the first gap: the bitmap is empty
            bitmap = _EMPTY
        else:
            bitmap = udpwire.bits(self.have[self.cum + 1 : self.cum + 1 + WINDOW]).to_bytes(udpwire.BITMAP_BYTES, "little")
        self.wire.send(self.address, self.keys.ack(self.tid, self.cum, bitmap))

    def abort(self) -> None:
        if self.keys is not None:
            self.wire.send(self.address, self.keys.abort(self.tid))

    def close(self) -> None:
        """Ended (well or not): the buffer goes to whoever took it; the transfer is only acknowledged from now on."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.closed_at = time.monotonic()
        if self.view is not None:
            self.view.release()  # the buffer is whoever took it's, free to resize
            self.view = None
        self.buf = bytearray()
        self.ephemeral = None


class UdpReceiver:
    def __init__(self, wire: Wire, stall_window: float, stall_rate: int, limit: int) -> None:
        self.wire = wire
        self.stall_window = stall_window
        self.stall_rate = stall_rate
        self.limit = limit  # transfers under way at once
        self.active: dict[bytes, Receiving] = {}
        self.ended: OrderedDict[bytes, tuple[float, Receiving]] = OrderedDict()
        self.failed: OrderedDict[bytes, None] = OrderedDict()  # recent transfers that failed: stragglers expected
        self.keyed: dict[tuple[str, int], list[Receiving]] = {}  # by sender: transfers whose chunks may still come

    def take(self, address: tuple[str, int], datagram: bytes) -> bool:
        """Whether ``datagram`` from ``address`` is a chunk of one of our transfers from there (see `Receiving.take`)."""
        for r in self.keyed.get(address, ()):
            if r.take(datagram):
                return True
        return False

    def _forget(self) -> None:
        """Transfers whose chunks are no longer expected leave `keyed`: those neither under way nor ended within
        ``LINGER`` seconds (each costs a failed decryption to every other datagram from its sender)."""
        now = time.monotonic()
        kept = {*self.active, *self.ended, *self.failed}
        for address in list(self.keyed):
            live = [r for r in self.keyed[address] if r.tid in kept and now - r.closed_at <= LINGER]
            if live:
                self.keyed[address] = live
            else:
                del self.keyed[address]

    def find(self, tid: bytes) -> Receiving | None:
        r = self.active.get(tid)
        if r is not None:
            return r
        ended = self.ended.get(tid)
        if ended is None:
            return None
        if time.monotonic() - ended[0] > LINGER:
            del self.ended[tid]
            self._forget()
            return None
        return ended[1]

    async def fetch(self, address: tuple[str, int], size: int, context: bytes, ask: Callable[[bytes, bytes], None],
                    connect_timeout: float, deadline: float) -> tuple[bytearray, bytes]:
        """``size`` bytes from the sender at ``address`` and their sha256. ``ask(tid, ephemeral)`` sends the signed
        request; ``deadline`` (`time.monotonic`) ends the whole transfer."""
        if len(self.active) >= self.limit:
            raise stream.FetchError("busy")
        tid = os.urandom(udpwire.TID_BYTES)
        ephemeral = Ephemeral()
        r = Receiving(tid, address, size, ephemeral, context, self.wire)
        self.active[tid] = r
        self.keyed[address] = [r, *self.keyed.get(address, ())]  # the newest first: its chunks are the ones coming
        try:
            await self._started(r, ask, ephemeral.public, min(deadline, time.monotonic() + connect_timeout))
            await self._finished(r, deadline)
            buf = r.buf
            if size > HASH_IN_THREAD:
                return buf, await asyncio.to_thread(_sha256, buf)
            return buf, _sha256(buf)
        except BaseException:
            r.abort()  # the sender stops at once instead of waiting for its own timeout
            raise
        finally:
            del self.active[tid]
            r.close()
            if r.complete:
                self.ended[tid] = (time.monotonic(), r)
                while len(self.ended) > LINGER_KEPT:
                    self.ended.popitem(last=False)
            else:
                remember(self.failed, tid)
            self._forget()

    async def _started(self, r: Receiving, ask: Callable[[bytes, bytes], None], public: bytes, by: float) -> None:
        while True:
            ask(r.tid, public)
            left = by - time.monotonic()
            if left <= 0:
                raise stream.FetchError("sender_silent")
            done, _ = await asyncio.wait([r.started], timeout=min(ASK_EVERY, left))
            if done:
                return

    async def _finished(self, r: Receiving, deadline: float) -> None:
        progress = stream.Progress(self.stall_window, self.stall_rate, r.size, time.monotonic())
        while not r.finished.done():
            now = time.monotonic()
            if now >= deadline:
                raise stream.FetchError("too_slow")
            await asyncio.wait([r.finished], timeout=min(progress.window_left(now), deadline - now) + 0.001)
            if r.finished.done():
                return
            now = time.monotonic()
            if now - r.heard >= self.stall_window:
                raise stream.FetchError("sender_vanished")
            progress.check(min(r.got * CHUNK, r.size), now)


def remember(recent: OrderedDict[bytes, None], tid: bytes) -> None:
    """``tid`` among the ``LINGER_KEPT`` transfers that ended last."""
    recent[tid] = None
    while len(recent) > LINGER_KEPT:
        recent.popitem(last=False)


def _sha256(buf: bytearray) -> bytes:
    return hashlib.sha256(buf).digest()
