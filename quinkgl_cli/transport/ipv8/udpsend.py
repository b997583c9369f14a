"""The sending end of a transfer over the punched UDP way: which chunk goes next, what is lost, how fast to go.

`Flight` is the bookkeeping (pure): the chunks in flight in the order they were sent, what the recipient's
selective acknowledgements say arrived, which chunks count as lost (three sent after one arrived while it did not,
fewer when fewer are out, or the retransmission timer ran out) and go again before any new one. `Congestion` is the rate rule, AIMD as TCP's
Reno: the window starts at 16 chunks, doubles every round trip until the first loss, then grows by one chunk a
round trip and halves at each loss (once per round trip of losses); a timeout drops it to 4. The window never
passes `udpwire.WINDOW`, what an acknowledgement can describe. `Rtt` keeps the retransmission timeout (RFC 6298's
estimator, 0.1 s to 2 s, doubled after each timeout). `Sending` runs one transfer on these, clocked by the
acknowledgements (after two round trips without one it sends the last chunk again to draw one: a tail loss probe,
so a lost acknowledgement does not cost a timeout), and gives up (`SendFailed`) when the recipient says so, falls
silent or the time is spent.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Protocol

from quinkgl_cli.transport.ipv8 import udpwire
from quinkgl_cli.transport.ipv8.udpwire import WINDOW, TransferKeys

DUPTHRESH = 3  # chunks sent after a missing one that must have arrived before it counts as lost
INITIAL_WINDOW = 16
MIN_WINDOW = 4
INITIAL_RTO = 0.25
MIN_RTO = 0.1  # above the recipient's delayed acknowledgement (`udprecv.ACK_DELAY`)
MAX_RTO = 2.0
BURST = 64  # chunks sent in one go before the event loop gets a turn
MIN_PROBE = 0.01  # a tail loss probe waits at least this long, and twice the smoothed round trip
MAX_QUEUED = 256 * 1024  # bytes waiting in our socket's send queue beyond which we wait for it to drain


class SendFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Wire(Protocol):
    """Where a transfer's datagrams go: the endpoint, or a test's network."""

    def send(self, address: tuple[str, int], packet: bytes) -> None:
        """A control datagram, sealed with the swarm key on its way out."""

    def send_sealed(self, address: tuple[str, int], datagrams: list[bytes]) -> None:
        """Chunks' datagrams, sealed under their transfer's key already: sent as they are, in order (in one system
        call where the system can)."""

    def queued(self) -> int:
        """Bytes of datagrams still waiting to leave."""


class Flight:
    def __init__(self, count: int) -> None:
        self.count = count
        self.acked = bytearray(count)
        self.cum = 0  # every chunk below it arrived
        self.next_new = 0  # the first chunk never sent
        self.inflight: OrderedDict[int, tuple[int, float, bool]] = OrderedDict()  # seq -> (tx, sent at, resent), by tx
        self.lost: deque[int] = deque()
        self.tx = 0  # transmissions so far, the order in which loss is judged
        self.high_tx = -1  # the latest transmission known to have arrived
        self.resent = 0

    @property
    def done(self) -> bool:
        return self.cum >= self.count

    def next(self) -> tuple[int, bool] | None:
        """The chunk to send next and whether it is a retransmission; None when the window allows nothing new."""
        while self.lost:
            seq = self.lost.popleft()
            if not self.acked[seq]:
                return seq, True
        if self.next_new < self.count and self.next_new < self.cum + WINDOW:
            self.next_new += 1
            return self.next_new - 1, False
        return None

    def sent(self, seq: int, now: float, resent: bool) -> None:
        self.inflight[seq] = (self.tx, now, resent)
        self.tx += 1
        self.resent += resent

    def on_ack(self, cum: int, bitmap: int, now: float) -> tuple[int, float | None, int]:
        """Take an acknowledgement: (chunks it newly acknowledged, a round-trip sample or None, the latest
        transmission it declared lost, -1 if none)."""
        cum = min(cum, self.next_new)  # nothing unsent can have arrived
        outstanding = len(self.inflight)
        newly, best, sample = 0, -1, None
        for seq in range(self.cum, cum):
            if not self.acked[seq]:
                newly += 1
                best, sample = self._mark(seq, now, best, sample)
        self.cum = max(self.cum, cum)
        known = udpwire.bits(self.acked[cum + 1 : cum + 1 + WINDOW])
        fresh = bitmap & ~known
        while fresh:
            low = fresh & -fresh
            seq = cum + low.bit_length()
            fresh ^= low
            if seq >= self.next_new:
                break
            newly += 1
            best, sample = self._mark(seq, now, best, sample)
        while self.cum < self.count and self.acked[self.cum]:
            self.cum += 1
        self.high_tx = max(self.high_tx, best)
        # Early retransmit (RFC 5827): with fewer than four chunks out, three later arrivals may never come.
        return newly, sample, self._judge(min(DUPTHRESH, max(1, outstanding - 1)))

    def _mark(self, seq: int, now: float, best: int, sample: float | None) -> tuple[int, float | None]:
        self.acked[seq] = 1
        entry = self.inflight.pop(seq, None)
        if entry is None or entry[0] < best:
            return best, sample
        tx, at, resent = entry
        return tx, (None if resent else now - at)  # Karn: a resent chunk's arrival times neither transmission

    def _judge(self, threshold: int) -> int:
        """Chunks sent ``threshold`` transmissions before one that arrived, and still missing, are lost."""
        latest = -1
        while self.inflight:
            seq, (tx, _at, _resent) = next(iter(self.inflight.items()))
            if tx + threshold > self.high_tx:
                break
            self.inflight.popitem(last=False)
            self.lost.append(seq)
            latest = tx
        return latest

    def expire(self) -> None:
        """The retransmission timer ran out: everything in flight is lost, lowest chunk first."""
        self.lost = deque(sorted({*self.lost, *self.inflight}))
        self.inflight.clear()


class Congestion:
    def __init__(self) -> None:
        self.cwnd = float(INITIAL_WINDOW)
        self.ssthresh = float(WINDOW)
        self.recovery_tx = -1  # losses of transmissions up to this one belong to the loss event already counted

    @property
    def window(self) -> int:
        return int(self.cwnd)

    def grew(self, acked: int) -> None:
        if self.cwnd < self.ssthresh:
            self.cwnd += acked
        else:
            self.cwnd += acked / self.cwnd
        self.cwnd = min(self.cwnd, float(WINDOW))

    def lost(self, tx: int, latest_tx: int) -> None:
        if tx <= self.recovery_tx:
            return
        self.ssthresh = max(float(MIN_WINDOW), self.cwnd / 2)
        self.cwnd = self.ssthresh
        self.recovery_tx = latest_tx

    def timed_out(self, latest_tx: int) -> None:
        self.ssthresh = max(float(MIN_WINDOW), self.cwnd / 2)
        self.cwnd = float(MIN_WINDOW)
        self.recovery_tx = latest_tx


class Rtt:
    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(MAX_RTO, max(MIN_RTO, self.srtt + 4 * self.rttvar))

    def backoff(self) -> None:
        self.rto = min(MAX_RTO, 2 * self.rto)


class Sending:
    """One transfer, sender's end: START until the recipient answers, then the chunks, until all are acknowledged."""

    def __init__(self, tid: bytes, address: tuple[str, int], payload: bytes | bytearray | memoryview, keys: TransferKeys,
                 ephemeral: bytes, wire: Wire) -> None:
        self.tid = tid
        self.address = address
        self.view = memoryview(payload).cast("B")
        self.keys = keys
        self.start = udpwire.start(tid, ephemeral)
        self.wire = wire
        self.flight = Flight(udpwire.chunks(self.view.nbytes))
        self.congestion = Congestion()
        self.rtt = Rtt()
        self.answered = False  # the recipient acknowledged our START
        self.aborted = False
        self.heard = 0.0  # when an acknowledgement last moved the transfer on, or the timer last ran out
        self.moved = 0.0  # when an acknowledgement last moved the transfer on
        self.probed = False  # a tail loss probe went since the transfer last moved on
        self._waiter: asyncio.Future[None] | None = None

    def resend_start(self) -> None:
        """The recipient asked again (its request or our START was lost)."""
        if not self.answered:
            self.wire.send(self.address, self.start)

    def on_packet(self, kind: int, packet: bytes, now: float) -> None:
        """An ACK or ABORT from the recipient's address; WireError when it does not open."""
        opened = self.keys.open_ack(packet)
        if opened is None:
            self.aborted = True
        else:
            self.answered = True
            newly, sample, lost_tx = self.flight.on_ack(opened[0], opened[1], now)
            if sample is not None:
                self.rtt.sample(sample)
            if lost_tx >= 0:
                self.congestion.lost(lost_tx, self.flight.tx - 1)
            if newly:
                self.congestion.grew(newly)
                self.heard = self.moved = now
                self.probed = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def run(self, deadline: float, idle: float) -> None:
        """Until every chunk is acknowledged; SendFailed when the recipient gave up (``recipient_gave_up``), was
        not heard from for ``idle`` seconds (``recipient_silent``) or ``deadline`` (loop time) passed (``too_slow``)."""
        loop = asyncio.get_running_loop()
        self.heard = self.moved = loop.time()
        start_due = 0.0
        while not self.flight.done:
            now = loop.time()
            if self.aborted:
                raise SendFailed("recipient_gave_up")
            if now >= deadline:
                raise SendFailed("too_slow")
            if now - self.moved >= idle:
                raise SendFailed("recipient_silent")
            wait = self.rtt.rto
            if not self.answered:
                if now >= start_due:
                    self.wire.send(self.address, self.start)
                    start_due = now + self.rtt.rto
                wait = start_due - now
            else:
                if self.flight.inflight and now - self.heard >= self.rtt.rto:
                    self.flight.expire()
                    self.congestion.timed_out(self.flight.tx - 1)
                    self.rtt.backoff()
                    self.heard, self.probed = now, False
                elif self.flight.inflight and not self.probed and now - self.heard >= self._probe_after():
                    self._probe()
                wait = self._pump(now)
            await self._sleep(loop, wait)

    def _pump(self, now: float) -> float:
        """Send what the window allows; how long to wait before looking again."""
        flight = self.flight
        seqs: list[int] = []
        wait: float | None = None
        if self.wire.queued() > MAX_QUEUED:
            wait = 0.002  # our socket's queue is full: let it drain
        while wait is None and len(flight.inflight) < self.congestion.window:
            if len(seqs) >= BURST:
                wait = 0.0  # more to send at once: let the loop read acknowledgements first
                break
            nxt = flight.next()
            if nxt is None:
                break
            seq, resent = nxt
            seqs.append(seq)
            flight.sent(seq, now, resent)
        if seqs:
            size, last = self.view.nbytes, seqs[-1]
            packets = []
            for seq in seqs:  # the burst's last asks to be acknowledged at once
                start, end = udpwire.chunk_span(seq, size)
                packets.append(self.keys.data(seq, self.view[start:end], push=seq == last))
            self.wire.send_sealed(self.address, packets)
        if wait is not None:
            return wait
        if not flight.inflight:
            return self.rtt.rto
        return max(0.0, self.heard + (self.rtt.rto if self.probed else self._probe_after()) - now)

    def _probe_after(self) -> float:
        """Seconds without news after which one chunk goes again to draw an acknowledgement (a tail loss probe)."""
        return min(self.rtt.rto, max(MIN_PROBE, 2 * (self.rtt.srtt if self.rtt.srtt is not None else MIN_PROBE)))

    def _probe(self) -> None:
        """The last chunk sent, again, asking for an acknowledgement: a lost acknowledgement or a lost last chunk
        costs a probe, not a retransmission timeout (a window's worth sent again)."""
        seq = next(reversed(self.flight.inflight))
        start, end = udpwire.chunk_span(seq, self.view.nbytes)
        self.wire.send_sealed(self.address, [self.keys.data(seq, self.view[start:end], push=True)])
        self.flight.resent += 1
        self.probed = True

    async def _sleep(self, loop: asyncio.AbstractEventLoop, wait: float) -> None:
        """Until an acknowledgement comes or ``wait`` seconds pass."""
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(max(wait, 0.0), lambda: None if waiter.done() else waiter.set_result(None))
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
