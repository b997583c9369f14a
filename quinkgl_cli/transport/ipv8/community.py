"""One IPv8 community per swarm: discovery through introductions, our signed messages decoded and handed on.

Owns packet dispatch only: each verified message goes to the `CommunityHandlers` it was given, and nothing here
knows the transport. The community id is a class attribute in pyipv8 (a constructor argument is silently
ignored), so each swarm gets its own subclass carrying an id derived from the swarm key; `community_class` checks
it took. The id travels only inside sealed datagrams (`seal`); derived from the key, not the swarm id, it names
nothing a non-member could look up (the LAN beacon and the fetch statements carry it too).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

from ipv8.community import Community, CommunitySettings
from ipv8.lazy_community import PacketDecodingError
from ipv8.messaging.interfaces.udp.endpoint import UDPv4Address
from ipv8.messaging.payload_headers import BinMemberAuthenticationPayload

from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.transport.ipv8.payloads import (
    BusyPayload,
    ByePayload,
    ControlPayload,
    DeclinePayload,
    ForwardedPayload,
    HelloHead,
    HelloPayload,
    OfferPayload,
    PathRequestPayload,
    RelayedPayload,
    RevocationPayload,
    RosterPayload,
    ServicesPayload,
    UdpPullPayload,
)
from quinkgl_cli.transport.ipv8.punctures import PunctureLimit

LOGGER_NAME = "quinkgl.transport.ipv8"
COMMUNITY_ID_BYTES = 20
# The messages a relay may bring us from another peer (`forward`): never a relayed message again (no chains), a
# roster, or IPv8's own introductions and punctures (those are about direct ways only).
RELAYABLE = frozenset(cls.msg_id for cls in (HelloPayload, OfferPayload, ControlPayload, ByePayload, DeclinePayload,
                                             RevocationPayload, ServicesPayload, PathRequestPayload,
                                             BusyPayload))


def community_id_for(swarm_key: bytes) -> bytes:
    """20 bytes naming the swarm's overlay: peers of another swarm never share a prefix with us."""
    return swarmkey.derive(swarm_key, b"community id", COMMUNITY_ID_BYTES)


class CommunityHandlers(Protocol):
    """What the community does with what it hears. ``key`` is the signer's public key (checked), ``source`` the
    datagram's address."""

    def on_contact(self, peer: Any) -> None:
        """IPv8 introduced us to ``peer`` (or it to us): greet it."""

    def on_bad_packet(self, source: tuple[str, int], reason: str, **fields: Any) -> None: ...

    def admits(self, source: tuple[str, int], signer: bytes) -> bool:
        """Whether to spend a signature check on a packet that says ``signer`` signed it (unchecked yet)."""

    def on_crowded(self) -> bool:
        """IPv8's peer list is full: make room if possible; True if there is room now."""

    def on_other_protocol(self, key: bytes, source: tuple[str, int], head: HelloHead) -> None: ...

    def on_hello(self, key: bytes, source: tuple[str, int], payload: HelloPayload) -> None: ...

    def on_offer(self, key: bytes, source: tuple[str, int], payload: OfferPayload) -> None: ...

    def on_control(self, key: bytes, source: tuple[str, int], payload: ControlPayload) -> None: ...

    def on_bye(self, key: bytes, source: tuple[str, int], payload: ByePayload) -> None: ...

    def on_decline(self, key: bytes, source: tuple[str, int], payload: DeclinePayload) -> None: ...

    def on_revocations(self, key: bytes, source: tuple[str, int], payload: RevocationPayload) -> None: ...

    def on_services(self, key: bytes, source: tuple[str, int], payload: ServicesPayload) -> None: ...

    def on_path_request(self, key: bytes, source: tuple[str, int], payload: PathRequestPayload) -> None: ...

    def on_relayed(self, key: bytes, source: tuple[str, int], payload: RelayedPayload) -> None: ...

    def on_forwarded(self, key: bytes, source: tuple[str, int], payload: ForwardedPayload) -> None: ...

    def on_roster(self, key: bytes, source: tuple[str, int], payload: RosterPayload) -> None: ...

    def on_udp_pull(self, key: bytes, source: tuple[str, int], payload: UdpPullPayload) -> None: ...

    def on_busy(self, key: bytes, source: tuple[str, int], payload: BusyPayload) -> None: ...


class SwarmSettings(CommunitySettings):
    handlers: CommunityHandlers
    protocol_version: int
    bound: tuple[str, int] = ("127.0.0.1", 0)


class SwarmCommunity(Community):
    community_id = b"\0" * 20  # replaced per swarm by community_class()

    def __init__(self, settings: SwarmSettings) -> None:
        self._bound = settings.bound
        self.handlers: CommunityHandlers = settings.handlers
        self._protocol_version = settings.protocol_version
        self.punctures = PunctureLimit()
        super().__init__(settings)
        quiet = logging.getLogger(LOGGER_NAME)
        self.logger = quiet
        self._logger = quiet
        self.my_estimated_lan = self._bound
        self.my_estimated_wan = self._bound
        self.add_message_handler(HelloPayload, self._on_hello)
        self.add_message_handler(OfferPayload, self._on_offer)
        self.add_message_handler(ControlPayload, self._on_control)
        self.add_message_handler(ByePayload, self._on_bye)
        self.add_message_handler(DeclinePayload, self._on_decline)
        self.add_message_handler(RevocationPayload, self._on_revocations)
        self.add_message_handler(ServicesPayload, self._on_services)
        self.add_message_handler(PathRequestPayload, self._on_path_request)
        self.add_message_handler(RelayedPayload, self._on_relayed)
        self.add_message_handler(ForwardedPayload, self._on_forwarded)
        self.add_message_handler(RosterPayload, self._on_roster)
        self.add_message_handler(UdpPullPayload, self._on_udp_pull)
        self.add_message_handler(BusyPayload, self._on_busy)

    # -- keep IPv8 away from the host's LAN addresses: it looks them up (a DNS query for the host name, a UDP socket
    # towards a TEST-NET address) and peers would send to them; LAN discovery is ours (`lan`), by beacon sources ----
    async def discover_lan_addresses(self) -> None:
        return None

    def address_is_lan(self, address: str) -> bool:
        return address == self._bound[0]

    def _get_lan_address(self, bootstrap: bool = False) -> tuple[str, int]:
        return self._bound[0], (0 if bootstrap else self._bound[1])

    def on_introduction_request(self, peer, dist, payload) -> None:  # type: ignore[no-untyped-def]
        """As IPv8's, except that a peer is answered where its packet came from, never at the LAN address it claims
        (that claim is how packets leak off loopback)."""
        # The network holds this community's peers only (one per transport): its size, not get_peers()'s scan of
        # every peer's key, which each stranger's introduction request paid.
        if 0 <= self.max_peers < len(self.network.verified_peers) and not self.handlers.on_crowded():
            return
        self.network.add_verified_peer(peer)
        self.network.discover_services(peer, [self.community_id])
        packet = self.create_introduction_response(
            payload.destination_address, peer.address, payload.identifier, new_style=peer.new_style_intro
        )
        self.endpoint.send(peer.address, packet)
        self.introduction_request_callback(peer, dist, payload)

    def on_puncture_request(self, source_address, dist, payload, new_style=False) -> None:  # type: ignore[no-untyped-def]
        """As IPv8's, within `punctures.PunctureLimit`: the request names any address and is not signed."""
        wan = payload.wan_walker_address
        target = payload.lan_walker_address if wan[0] == self.my_estimated_wan[0] else wan
        if not self.punctures.allow(_addr(target), time.monotonic()):
            return
        super().on_puncture_request(source_address, dist, payload, new_style)

    def introduction_request_callback(self, peer, dist, payload) -> None:  # type: ignore[no-untyped-def]
        self.handlers.on_contact(peer)

    def introduction_response_callback(self, peer, dist, payload) -> None:  # type: ignore[no-untyped-def]
        self.handlers.on_contact(peer)

    # -- packets -------------------------------------------------------------------------------------------------
    def on_packet(self, packet: tuple[Any, bytes], warn_unknown: bool = True) -> None:
        """IPv8's dispatch without its error path, which logs a traceback and the whole payload per bad packet."""
        source, data = packet
        self._dispatch(source, data, None)

    def on_relayed_packet(self, source: tuple[str, int], data: bytes) -> None:
        """A packet another peer signed, brought by a relay (`forward`): checked and handled as if it came from
        ``source`` (where the relay sees that peer), if it is one of the `RELAYABLE` messages."""
        self._dispatch(source, data, RELAYABLE)

    def _dispatch(self, source: Any, data: bytes, only: frozenset[int] | None) -> None:
        if data[:22] != self._prefix or len(data) < 23:
            return
        if only is not None and data[22] not in only:
            self.handlers.on_bad_packet(_addr(source), "not_relayable")
            return
        key = signer(data)
        if not self.handlers.admits(_addr(source), key):
            return  # before the signature check: a flood costs us a dictionary lookup per packet, not a verify
        handler = self.decode_map[data[22]]
        if handler is None:
            self.handlers.on_bad_packet(_addr(source), "unknown_message")
            return
        try:
            result = handler(source, data)
            if result is not None and hasattr(result, "close"):
                result.close()  # no handler of ours is a coroutine; refuse to leave one un-awaited
        except PacketDecodingError as exc:
            self.handlers.on_bad_packet(_addr(source), "bad_signature" if "signature" in str(exc) else "malformed")
            return
        except Exception:  # a malformed datagram raises whatever the unpacker trips on
            self.handlers.on_bad_packet(_addr(source), "malformed", detail=type(sys.exc_info()[1]).__name__)
            return
        # IPv8 marks the sender alive by looking its address up among its peers, a scan of them all for an address
        # it does not know: ~90 us per packet with 256 peers, paid by every datagram of a flood before the gate
        # above. By the key that signed a packet just handled, it is one dictionary lookup.
        known = self.network.get_verified_by_public_key_bin(key)
        if known:
            known.last_response = time.time()

    def _on_hello(self, source: Any, data: bytes) -> None:
        key, body = self._verified(data)
        head, _ = self.serializer.unpack_serializable(HelloHead, body, offset=23)
        if head.protocol != self._protocol_version:
            self.handlers.on_other_protocol(key, _addr(source), head)
            return
        payload, _ = self.serializer.unpack_serializable(HelloPayload, body, offset=23)
        self.handlers.on_hello(key, _addr(source), payload)

    def _on_offer(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(OfferPayload, data)
        self.handlers.on_offer(key, _addr(source), payload)

    def _on_control(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(ControlPayload, data)
        self.handlers.on_control(key, _addr(source), payload)

    def _on_bye(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(ByePayload, data)
        self.handlers.on_bye(key, _addr(source), payload)

    def _on_decline(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(DeclinePayload, data)
        self.handlers.on_decline(key, _addr(source), payload)

    def _on_revocations(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(RevocationPayload, data)
        self.handlers.on_revocations(key, _addr(source), payload)

    def _on_services(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(ServicesPayload, data)
        self.handlers.on_services(key, _addr(source), payload)

    def _on_path_request(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(PathRequestPayload, data)
        self.handlers.on_path_request(key, _addr(source), payload)

    def _on_relayed(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(RelayedPayload, data)
        self.handlers.on_relayed(key, _addr(source), payload)

    def _on_forwarded(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(ForwardedPayload, data)
        self.handlers.on_forwarded(key, _addr(source), payload)

    def _on_roster(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(RosterPayload, data)
        self.handlers.on_roster(key, _addr(source), payload)

    def _on_udp_pull(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(UdpPullPayload, data)
        self.handlers.on_udp_pull(key, _addr(source), payload)

    def _on_busy(self, source: Any, data: bytes) -> None:
        key, payload = self._unpack_signed(BusyPayload, data)
        self.handlers.on_busy(key, _addr(source), payload)

    def _unpack_signed(self, cls: Any, data: bytes) -> tuple[bytes, Any]:
        key, body = self._verified(data)
        payload, _ = self.serializer.unpack_serializable(cls, body, offset=23)
        return key, payload

    def _verified(self, data: bytes) -> tuple[bytes, bytes]:
        """The signer's key and the signed bytes (the payload starts at offset 23), once the signature checked."""
        auth, _ = self.serializer.unpack_serializable(BinMemberAuthenticationPayload, data, offset=23)
        valid, body = self._verify_signature(auth, data)
        if not valid:
            raise PacketDecodingError("invalid signature")
        return auth.public_key_bin, body

    def send_signed(self, address: tuple[str, int], payload: Any) -> None:
        self._ez_senda(UDPv4Address(*address), payload)

    def pack_signed(self, payload: Any) -> bytes:
        """The datagram `send_signed` would send: what a relay carries for us, signed end to end."""
        return self.ezr_pack(payload.msg_id, payload)


def _addr(source: Any) -> tuple[str, int]:
    return str(source[0]), int(source[1])


def signer(data: bytes) -> bytes:
    """The public key a signed packet names (its BinMemberAuthenticationPayload at offset 23: a 2-byte length,
    then the key), unchecked; empty if there is none."""
    if len(data) < 25:
        return b""
    return data[25 : 25 + int.from_bytes(data[23:25], "big")]


def community_class(swarm_key: bytes) -> type[SwarmCommunity]:
    cid = community_id_for(swarm_key)
    cls: type[SwarmCommunity] = type(f"SwarmCommunity_{cid.hex()[:12]}", (SwarmCommunity,), {"community_id": cid})
    if cls.community_id != cid or len(cid) != COMMUNITY_ID_BYTES:
        raise RuntimeError("community id did not take")
    return cls
