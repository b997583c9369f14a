"""The last way an offer's bytes can take: over the UDP way the two peers already exchange datagrams on.

Used when no TCP way connects (`links`: direct, reverse, relay) but the peers reach each other's UDP sockets, as
two peers behind endpoint-independent NATs do once punched, or two peers whose firewalls drop TCP. Owns both ends'
transfers under way and which one each transfer datagram belongs to (`udpwire`): the recipient's side is
`udprecv.UdpReceiver`, the sender's the `udpsend.Sending` it runs for each signed `UdpPullPayload` that names one
of our offers to the peer that signed it. The sender serves at most ``SENDS`` transfers at once (a request beyond
them is answered busy, `busy`) and an offer once (whichever way takes it first); a peer we reach only through a relay (`forward`) gets none (its datagrams do not
come to us directly). A control datagram from any address but the other end's, for a transfer we do not run, or
that does not open under its key is refused and counted (``udp-refused``), never acted on, as is a chunk that
opens under a transfer's key but lies outside its window or size; a datagram from the sender's address that opens
under no transfer's key is no chunk and goes on to the swarm seal and IPv8; stragglers of a transfer
that ended lately (an acknowledgement still on its way, chunks sent before a failure) are dropped without a word.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from quinkgl_cli.events import emit
from quinkgl_cli.transport.base import TransferDone, TransportStats
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8 import udpwire
from quinkgl_cli.transport.ipv8.busy import BusyReplies
from quinkgl_cli.transport.ipv8.channel import ChannelError, Ephemeral
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.outbox import Outbox, Outgoing
from quinkgl_cli.transport.ipv8.paths import UDP
from quinkgl_cli.transport.ipv8.payloads import OfferPayload, UdpPullPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord
from quinkgl_cli.transport.ipv8.runtime import TaskRegistry
from quinkgl_cli.transport.ipv8.settings import TransportSettings
from quinkgl_cli.transport.ipv8.udprecv import UdpReceiver, remember
from quinkgl_cli.transport.ipv8.udpsend import SendFailed, Sending, Wire
from quinkgl_cli.transport.ipv8.udpwire import WireError

log = logging.getLogger("quinkgl.transport")
SENDS = 4  # transfers we send over UDP at once
# Of those, to one recipient: a recipient that asks and never acknowledges holds a send until it is given up on
# (10 s), and with an offer a round it held all four, every other peer fetching over UDP answered busy.
SENDS_PER_PEER = 1


class UdpWay:
    def __init__(self, settings: TransportSettings, community_id: bytes, courier: Courier, outbox: Outbox, wire: Wire,
                 tasks: TaskRegistry, drops: DropLog, stats: TransportStats, revoked: Callable[[bytes], bool],
                 report: Callable[[TransferDone], None], busy: BusyReplies) -> None:
        self.settings = settings
        self.community_id = community_id
        self.courier = courier
        self.outbox = outbox
        self.wire = wire
        self.tasks = tasks
        self.drops = drops
        self.stats = stats
        self.revoked = revoked
        self.report = report
        self.busy = busy
        limits = settings.limits
        self.receiver = UdpReceiver(wire, limits.stall_window, limits.stall_rate, settings.max_concurrent_fetches)
        self.sending: dict[bytes, Sending] = {}
        self.sent: OrderedDict[bytes, None] = OrderedDict()  # transfers we sent lately, ended well or not
        self.refused = 0  # transfer datagrams refused (foreign, altered, out of window, for no transfer of ours)

    # -- every transfer datagram, from the endpoint -----------------------------------------------------------
    def take(self, address: tuple[str, int], datagram: bytes) -> bool:
        """A datagram as it came (before the swarm seal): True when it is a chunk of one of our transfers from
        ``address``, sealed under that transfer's key (`udpwire`); False sends it on to the swarm seal and IPv8."""
        try:
            return self.receiver.take(address, datagram)
        except WireError as exc:
            self._refuse(address, exc)
            return True

    def on_datagram(self, address: tuple[str, int], packet: bytes) -> None:
        """A control datagram (START, ACK, ABORT), opened by the endpoint with the swarm key."""
        try:
            kind, tid = udpwire.head(packet)
            if kind == udpwire.START:
                r = self.receiver.find(tid)
                if r is None and tid in self.receiver.failed:
                    return
                if r is None or r.address != address:
                    raise WireError("unknown_transfer")
                r.on_start(packet)
            else:
                s = self.sending.get(tid)
                if s is None and tid in self.sent:
                    return
                if s is None or s.address != address:
                    raise WireError("unknown_transfer")
                s.on_packet(kind, packet, asyncio.get_running_loop().time())
        except WireError as exc:
            self._refuse(address, exc)

    def _refuse(self, address: tuple[str, int], exc: WireError) -> None:
        self.refused += 1
        self.drops("udp-refused", f"{address[0]}:{address[1]}", exc.reason)

    # -- recipient --------------------------------------------------------------------------------------------
    async def fetch(self, rec: PeerRecord, p: OfferPayload) -> tuple[bytearray, bytes]:
        """The bytes of ``p`` from ``rec`` over UDP and their sha256; `stream.FetchError` with the reason if not,
        `busy.SenderBusy` as soon as the sender says it has no room."""
        s = self.settings

        def ask(tid: bytes, ephemeral: bytes) -> None:
            self.courier.send(rec.address, UdpPullPayload(s.swarm_id, *self.courier.stamp(), p.offer_id,
                                                          int.from_bytes(tid, "little"), ephemeral))

        deadline = time.monotonic() + s.connect_timeout + s.fetch_timeout + p.size / s.limits.min_rate
        return await self.busy.unless_busy(rec, p.offer_id, UDP, self.receiver.fetch(
            rec.address, p.size, self.community_id + p.offer_id, ask, s.connect_timeout, deadline))

    # -- sender -----------------------------------------------------------------------------------------------
    def on_pull(self, rec: PeerRecord, p: UdpPullPayload) -> None:
        """``rec`` asks for our offer over UDP: send it, if the request holds and we have room."""
        out = self.outbox.offers.get(p.offer_id)
        if p.swarm_id != self.settings.swarm_id or out is None or out.recipient != rec.node_id:
            self.drops("pull-refused", rec.node_id, "unknown_offer")
            return
        tid = p.transfer_id.to_bytes(udpwire.TID_BYTES, "little")
        current = self.sending.get(tid)
        if current is not None:
            if current.address == rec.address:
                current.resend_start()
            return
        if out.serving:
            return  # on its way already, by another way or an earlier request
        if rec.via is not None:  # its datagrams reach us through a relay: a UDP transfer would not
            self.drops("pull-refused", rec.node_id, "relayed_peer")
            return
        if rec.key_bin != out.recipient_key.key_to_bin() or self.revoked(rec.key_bin):
            self.drops("pull-refused", rec.node_id, "not_recipient")
            return
        if len(self.sending) >= SENDS or sum(x.address == rec.address for x in self.sending.values()) >= SENDS_PER_PEER:
            self.drops("pull-refused", rec.node_id, "busy")
            self.busy.reply(rec, p.offer_id, UDP)
            return
        ephemeral = Ephemeral()
        context = self.community_id + p.offer_id + ephemeral.public + p.ephemeral
        try:
            keys = udpwire.TransferKeys.derive(ephemeral, p.ephemeral, context, tid)
        except ChannelError as exc:
            self.drops("pull-refused", rec.node_id, exc.reason)
            return
        sending = Sending(tid, rec.address, out.payload, keys, ephemeral.public, self.wire)
        out.serving = True
        self.sending[tid] = sending
        self.tasks.spawn(self._serve(out, sending), f"udp-send-{rec.node_id}")

    async def _serve(self, out: Outgoing, sending: Sending) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        started, ok = time.monotonic(), False
        try:
            await sending.run(loop.time() + s.connect_timeout + s.fetch_timeout + out.size / s.limits.min_rate,
                              s.fetch_timeout)
            ok = True
        except (SendFailed, WireError) as exc:  # WireError: the transfer key's nonces ran out
            self.drops("serve-failed", out.recipient, exc.reason, path=UDP)
        finally:
            del self.sending[sending.tid]
            remember(self.sent, sending.tid)
            self.report(TransferDone("send", out.recipient, out.round, out.size, time.monotonic() - started, "udp", ok))
        if not ok:
            self.outbox.offers.pop(out.offer_id, None)
            return
        self.stats.models_sent += 1
        self.stats.bytes_sent += out.size
        self.outbox.served(out)
        flight = sending.flight
        emit(log, logging.DEBUG, "udp-sent", context={"node": s.node_id}, peer=out.recipient, bytes=out.size,
             datagrams=flight.tx, resent=flight.resent, window=sending.congestion.window,
             seconds=round(time.monotonic() - started, 4))
