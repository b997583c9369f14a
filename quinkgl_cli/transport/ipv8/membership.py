"""Who is in the swarm, as this node sees it: hellos and goodbyes, discovery walks and heartbeats, silence.

Owns the peer table's admission and loss decisions, the seeds to walk to and the replay checks every signed message passes (`fresh`).
Other parts ask it for the sender of a message; only it adds peers to the table or removes them. A hello is first
put to `transport.admission` (certificate, revocation) before anything else is done with it; then a node id held
by another key, or still held for a lost peer's key (`peers`), is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ipv8.keyvault.crypto import default_eccrypto
from ipv8.peerdiscovery.discovery import RandomWalk

from quinkgl_cli import validation
from quinkgl_cli.errors import NetworkError
from quinkgl_cli.events import emit
from quinkgl_cli.transport.admission import Admission
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.community import SwarmCommunity
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.endpoint import DestinationGuard
from quinkgl_cli.transport.ipv8.gate import PacketGate
from quinkgl_cli.transport.ipv8.payloads import ByePayload, HelloHead, HelloPayload, RevocationPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.ratelimit import Cooldown
from quinkgl_cli.transport.ipv8.replay import ReplayGuard
from quinkgl_cli.transport.ipv8.revocations import RevocationGossip
from quinkgl_cli.transport.ipv8.runtime import NodeEvents
from quinkgl_cli.transport.ipv8.settings import TransportSettings, label

log = logging.getLogger("quinkgl.transport")
LOCAL_SEED_POLL = 2.0  # seconds between reads of the rendezvous directory (a few small files)
CROWDED_HEARTBEAT = 3  # heartbeats to untrusted peers this many times further apart when they crowd the table


class Membership:
    def __init__(
        self,
        settings: TransportSettings,
        table: PeerTable,
        courier: Courier,
        community: SwarmCommunity,
        events: NodeEvents,
        drops: DropLog,
        tcp_port: int,
        seeds: list[tuple[str, int]],
        on_lost: Callable[[str, tuple[str, int], str], None],  # node id, its address, why it was lost
        admission: Admission,
        local_seeds: Callable[[], list[tuple[str, int]]] | None = None,
        backlog: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.settings = settings
        self.table = table
        self.courier = courier
        self.community = community
        self.events = events
        self.drops = drops
        self.tcp_port = tcp_port
        self.seeds = seeds
        self.on_lost = on_lost
        self.admission = admission
        self._joins = Cooldown(settings.limits.strangers.joins_window, settings.limits.strangers.joins_per_key)
        self.gossip = RevocationGossip(settings, admission, table, courier, community.my_peer.public_key.key_to_bin(),
                                       self.lose, drops)
        self.replay = ReplayGuard()
        self.walker = RandomWalk(community, timeout=3.0, window_size=5, reset_chance=30)
        self._seed_walked: dict[tuple[str, int], float] = {}
        self.local_seeds = local_seeds  # re-read every LOCAL_SEED_POLL seconds: daemons come and go
        self._local: list[tuple[str, int]] = []
        self._local_read = float("-inf")
        self.gate = PacketGate(settings.limits, table, drops, frozenset(seeds), backlog)
        self.active = True  # False once the transport stops: nothing more is reported to the node

    # -- periodic work -----------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Walk towards seeds not yet met, step the random walk, greet new contacts, heartbeat, lose the silent."""
        s = self.settings
        known = self.table.addresses()
        if self.local_seeds is not None and now - self._local_read >= LOCAL_SEED_POLL:
            self._local_read = now
            self._local = self.local_seeds()
            self.gate.named = frozenset({*self.seeds, *self._local})
        for seed in [*self.seeds, *self._local]:
            if seed not in known and now - self._seed_walked.get(seed, 0.0) >= max(1.0, s.walk_interval):
                self._seed_walked[seed] = now
                self.community.walk_to(seed)
                # Also greet it directly: a seed whose IPv8 peer list is crowded (a flood of fresh keys) drops the
                # walk's introduction request, but it still hears a hello, and admits us as vouched if we are its seed.
                self._send_hello(seed, want_reply=True)
        self.gossip.tick()
        if self.community.bootstrappers and not self.community.get_peers():
            self.community.bootstrap()
        self.walker.take_step()
        if not self.table.full():  # else a stranger could not get in: it greets us itself if it may (a seed)
            for peer in self.community.get_peers():
                key = peer.public_key.key_to_bin()
                if self.table.node_of(key) is None:
                    self.hello(key, _addr(peer.address), want_reply=True, min_gap=2.0)
        named = {*self.seeds, *self._local}
        # Among a crowd of untrusted peers (a flood of fresh keys), greet them less often: still within their silence
        # timeout, but the signatures go to the peers we learn with.
        crowded = self.table.untrusted() > s.limits.strangers.free
        for rec in self.table:
            if not rec.vouched and rec.address in named and self._vouched(rec.address):
                rec.vouched = True  # it said hello before we read its rendezvous entry
            every = s.heartbeat_interval * (CROWDED_HEARTBEAT if crowded and not rec.trusted else 1)
            if now - rec.last_seen > s.silence_timeout:
                self.lose(rec.node_id, "silence")
            elif now - self.table.hello_sent(rec.key_bin) >= every:
                self.hello(rec.key_bin, rec.address, want_reply=False, min_gap=0.0)

    def hello(self, key: bytes, address: tuple[str, int], want_reply: bool, min_gap: float) -> None:
        now = time.monotonic()
        if now - self.table.hello_sent(key) < min_gap:
            return
        self.table.mark_hello(key, now)
        self._send_hello(address, want_reply)

    def _send_hello(self, address: tuple[str, int], want_reply: bool) -> None:
        self.courier.send(address, self.hello_payload(want_reply))

    def hello_payload(self, want_reply: bool) -> HelloPayload:
        s = self.settings
        return HelloPayload(s.swarm_id, s.node_id, s.arch_hash, s.protocol_version, *self.courier.stamp(), self.tcp_port,
                            want_reply, self.admission.certificate)

    def say_goodbye(self) -> None:
        for rec in self.table:
            self.courier.send(rec.address, ByePayload(self.settings.swarm_id, *self.courier.stamp(), self.settings.node_id))

    # -- incoming ----------------------------------------------------------------------------------------------
    def on_contact(self, peer: Any) -> None:
        key = peer.public_key.key_to_bin()
        rec = self.table.by_key(key)
        if rec is None and not self.table.full():
            self.hello(key, _addr(peer.address), want_reply=True, min_gap=1.0)
        elif rec is not None and rec.via is not None:  # a peer we reach through a relay reached us directly: go direct
            self.courier.unroute(_addr(peer.address))
            self._send_hello(_addr(peer.address), want_reply=True)

    def on_other_protocol(self, source: tuple[str, int], head: HelloHead) -> None:
        self.drops("peer-refused", label(head.node_id, source), "protocol_mismatch", theirs=head.protocol,
                   ours=self.settings.protocol_version)

    def on_hello(self, key: bytes, source: tuple[str, int], p: HelloPayload, via: str | None = None) -> None:
        """``via``: the relay peer that brought it (`forward`); None when it came straight from ``source``."""
        s = self.settings
        node_id = p.node_id
        who = label(node_id, source)
        if not validation.is_node_id(node_id):
            self.drops("peer-refused", who, "bad_node_id")
            return
        refused = self.admission.refusal(node_id, key, p.certificate)
        if refused is not None:
            self._refuse_key(key, who, refused)
            return
        if p.swarm_id != s.swarm_id:
            self.drops("peer-refused", who, "swarm_mismatch", theirs=p.swarm_id[:80])
            return
        if p.arch_hash != s.arch_hash:
            self.drops("peer-refused", who, "arch_mismatch", theirs=p.arch_hash[:80], ours=s.arch_hash)
            return
        if node_id == s.node_id:
            self.drops("peer-refused", who, "node_id_taken", detail="same as ours")
            return
        now = time.monotonic()
        holder = self.table.by_key(key)
        renamed = holder if holder is not None and holder.claimed != node_id else None
        if renamed is not None:
            holder = None
        name = holder.node_id if holder is not None else self._name(node_id, key, who, now)
        if name is None:
            return
        # A relay says where it sees the peer: no address it names vouches for anyone.
        vouched = holder.vouched if holder is not None else self._vouched(source) and via is None
        if holder is None and renamed is None and self.table.full() and not self._evict_for(who, vouched):
            self.drops("peer-refused", who, "peer_limit", limit=self.table.capacity)
            return
        if not self._admit(key, p.session, p.counter, "peer-refused", who, source):
            return  # a captured hello sent again: it must not move the peer's address or restart it
        if (holder is None or holder.session != p.session) and not self._joins.allow(key, now):
            # A key that joined moments ago comes again under a new session or node id: each time its old entry
            # would be lost and a new one discovered, two log lines and a name the node remembers for good (one
            # key renaming itself at every hello made 6,800 such lines in 40 s and grew every checkpoint by 190 KB).
            # A real restart takes seconds; should it come again and again, its hellos (one every heartbeat) are taken
            # once its window has passed.
            self.drops("peer-refused", f"key:{key.hex()[-16:]}", "rejoining_too_fast", claims=who)
            return
        if renamed is not None:
            self.lose(renamed.node_id, "renamed")
        if holder is not None and holder.session != p.session:
            self.lose(name, "restarted")
            holder = None
            name = self.table.name_for(node_id, key, now, s.limits.id_hold)  # its own id again, held for its key
        if holder is None:
            rec = PeerRecord(name, key, hashlib.sha1(key).digest(), source, p.tcp_port, now, p.session,
                             default_eccrypto.key_from_public_bin(key), first_seen=now, claimed=node_id, vouched=vouched,
                             via=via)
            self.table.add(rec)
            emit(log, logging.DEBUG, "peer-discovered", context={"node": s.node_id}, peer=name,
                 address=f"{source[0]}:{source[1]}", key=key.hex()[-16:])
            self.events.peer_discovered(rec.info())
            self.gossip.share_with(rec)
        else:
            if via is None or holder.via is not None:  # a relayed hello never moves a peer we reach directly
                if via is None and holder.via is not None:
                    self.courier.unroute(holder.address)
                holder.address, holder.via = source, via
            holder.tcp_port = p.tcp_port
            holder.last_seen = now
        if via is None:
            self.courier.unroute(source)  # it answers straight from there: nothing for that address needs a relay
        if p.want_reply or holder is None:  # first sight: tell the peer our session before it sends us anything
            self.hello(key, source, want_reply=False, min_gap=0.0)

    def _name(self, node_id: str, key: bytes, who: str, now: float) -> str | None:
        """The name a new peer ``key`` claiming ``node_id`` is known by, or None (refused, logged). In an open swarm a
        taken id gives the newcomer an alias (see `peers`); in a certified one the certificate binds the id to one
        key, so two keys claiming it means a re-keyed node or a creator's mistake: the one already here keeps it."""
        name = self.table.name_for(node_id, key, now, self.settings.limits.id_hold)
        if name == node_id:
            return name
        if self.admission.settings.certified:
            self.drops("peer-refused", who, "node_id_taken")
            return None
        taken = self.table.get(name)
        if taken is not None and taken.key_bin != key:  # 64 bits of two keys alike: not by chance
            self.drops("peer-refused", who, "node_id_taken", detail="alias taken")
            return None
        return name

    def _refuse_key(self, key: bytes, who: str, reason: str) -> None:
        """A key that may not be a peer (no valid certificate, revoked): logged once per key and reason, dropped
        from the table if it was in it (a certificate that expired, a revocation), and forgotten by IPv8 so that
        we stop greeting it."""
        self.drops("peer-refused", f"key:{key.hex()[-16:]}", reason, claims=who)
        known = self.table.node_of(key)
        if known is not None:
            self.lose(known, reason)
        peer = self.community.network.get_verified_by_public_key_bin(key)
        if peer is not None:
            self.community.network.remove_peer(peer)

    def on_revocations(self, key: bytes, source: tuple[str, int], p: RevocationPayload) -> None:
        rec = self.fresh(key, source, p.session, p.counter, "revocations-refused")
        if rec is not None:
            self.gossip.on_message(rec, p)

    def named(self) -> int:
        """How many peer addresses the operator named (bootstrap peers, rendezvous entries on this host)."""
        return len(self.gate.named)

    def admits(self, source: tuple[str, int], signer: bytes) -> bool:
        return self.gate.admits(source, signer)

    def _vouched(self, source: tuple[str, int]) -> bool:
        """Whether a new peer at ``source`` is vouched for (see `peers`): certified, or at an address the operator
        named that no other vouched peer holds (a forged source address gains one entry at most)."""
        if self.admission.settings.certified:
            return True
        if source not in self.seeds and source not in self._local:
            return False
        return not any(rec.vouched and rec.address == source for rec in self.table)

    def _evict_for(self, newcomer: str, vouched: bool = False) -> bool:
        """Make room in the full table for ``newcomer`` by evicting an untrusted peer past its grace (any untrusted
        peer for a vouched newcomer); False if none."""
        victim = self.table.eviction_candidate(time.monotonic(), self.settings.limits.strangers.grace, vouched)
        if victim is None:
            return False
        emit(log, logging.DEBUG, "peer-evicted", context={"node": self.settings.node_id}, peer=victim.node_id,
             reason="untrusted", newcomer=newcomer)
        self.lose(victim.node_id, "evicted")
        return True

    def make_room(self) -> bool:
        """IPv8's own peer list is full (introductions beyond it are dropped): forget the keys it holds that are
        not our peers (refused, evicted, or never said hello), else evict one untrusted peer. True if room was made."""
        network = self.community.network
        strangers = [p for p in network.verified_peers if self.table.node_of(p.public_key.key_to_bin()) is None]
        for peer in strangers:
            network.remove_peer(peer)
        return bool(strangers) or self._evict_for("-")

    def on_bye(self, key: bytes, source: tuple[str, int], p: ByePayload) -> None:
        if self.table.node_of(key) is None:
            return  # a goodbye from a peer already lost (or never met): nothing to do, nothing to report
        rec = self.fresh(key, source, p.session, p.counter, "bye-refused")
        if rec is not None and p.node_id == rec.claimed and p.swarm_id == self.settings.swarm_id:
            self.lose(rec.node_id, "bye")

    def fresh(self, key: bytes, source: tuple[str, int], session: int, counter: int, event: str) -> PeerRecord | None:
        """The known peer that signed a message of its current session never seen before, its silence timer reset;
        else None, with the message dropped and the reason logged once."""
        rec = self.table.by_key(key)
        if rec is None:
            self.drops(event, f"{source[0]}:{source[1]}", "unknown_sender")
            return None
        if not self._admit(key, session, counter, event, rec.node_id, source):
            return None
        if session != rec.session:  # it restarted and its hello is still on the way: its new run is not known yet
            self.drops(event, rec.node_id, "session_mismatch")
            return None
        rec.last_seen = time.monotonic()
        return rec

    def _admit(self, key: bytes, session: int, counter: int, event: str, who: str, source: tuple[str, int]) -> bool:
        if self.replay.admit(key, session, counter):
            return True
        self.drops(event, who, "replay", source=f"{source[0]}:{source[1]}")
        return False

    def lose(self, node_id: str, reason: str) -> None:
        # Its key keeps the node id a while (a restart, a moment's silence), unless the key was revoked.
        freed = reason in ("revoked", "certificate_revoked")
        rec = self.table.remove(node_id, released_at=None if freed else time.monotonic())
        if rec is None:
            return
        self.gate.forget(node_id)
        self.on_lost(node_id, rec.address, reason)
        known = self.community.network.get_verified_by_public_key_bin(rec.key_bin)
        if known is not None:
            self.community.network.remove_peer(known)
        # The node logs peer-lost at INFO for the operator; this line adds why, for whoever debugs the transport.
        emit(log, logging.DEBUG, "peer-lost", context={"node": self.settings.node_id}, peer=node_id, reason=reason)
        if self.active:
            self.events.peer_lost(rec.info())


def _addr(address: Any) -> tuple[str, int]:
    return str(address[0]), int(address[1])


def add_bootstrappers(community: SwarmCommunity, settings: TransportSettings) -> None:
    """IPv8's public bootstrap servers, only when asked for (LAN discovery is ours: `lan`)."""
    if settings.enable_public_bootstrap:
        from ipv8.bootstrapping.dispersy.bootstrapper import DispersyBootstrapper
        from ipv8.configuration import DISPERSY_BOOTSTRAPPER

        community.bootstrappers.append(DispersyBootstrapper(**DISPERSY_BOOTSTRAPPER["init"]))


async def resolve_seeds(settings: TransportSettings, guard: DestinationGuard, udp_port: int) -> list[tuple[str, int]]:
    """The bootstrap peers as addresses (names resolved once, at start), without our own."""
    loop = asyncio.get_running_loop()
    out: list[tuple[str, int]] = []
    for host, port in settings.bootstrap:
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass  # a name: resolved below
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), 5.0)
        except (OSError, TimeoutError) as exc:
            raise NetworkError(f"cannot resolve bootstrap peer {host}:{port}: {exc}", "check the name or give an IP address") from exc
        for info in infos[:1]:
            resolved = str(info[4][0]), int(info[4][1])
            if not guard.allows(resolved[0]):
                raise NetworkError(f"bootstrap peer {host} resolves to {resolved[0]}, not allowed from {settings.listen_host}")
            out.append(resolved)
    own = (settings.listen_host, udp_port)
    return [s for s in out if s != own]
