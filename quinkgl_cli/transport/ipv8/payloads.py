"""The signed messages of a swarm community. Compiled VariablePayloads: cheap to build on hot paths.

Every one of them travels signed and the signature is checked before anything is unpacked, so the sender's key is
known. IPv8 has no replay protection of its own: the swarm id, the intended recipient, and the sender's
``session`` and ``counter`` (see `replay`) sit inside the signed bytes, so a captured packet is refused when sent
again, from wherever.
"""

from __future__ import annotations

from ipv8.messaging.lazy_payload import VariablePayload, vp_compile


@vp_compile
class HelloHead(VariablePayload):
    """The first fields of every protocol version's hello, read first: a peer of another version is refused as
    such (logged once) instead of as a malformed packet. Later versions may change what follows, never these."""

    msg_id = 1
    format_list = ["varlenHutf8", "varlenHutf8", "varlenHutf8", "H"]
    names = ["swarm_id", "node_id", "arch_hash", "protocol"]


@vp_compile
class HelloPayload(VariablePayload):
    """Who I am and what I run; ``want_reply`` on first contact so the other side answers at once.

    A newer ``session`` than the one known for a key means the peer restarted (its round numbers may go back to a
    checkpoint's): it is reported lost and rediscovered rather than taken for the same run. ``certificate`` is the
    sender's admission certificate (JSON, `quinkgl_cli.manifest.admission`) in a certified swarm, else empty.
    """

    msg_id = 1
    format_list = ["varlenHutf8", "varlenHutf8", "varlenHutf8", "H", "Q", "Q", "H", "?", "varlenH"]
    names = ["swarm_id", "node_id", "arch_hash", "protocol", "session", "counter", "tcp_port", "want_reply", "certificate"]


@vp_compile
class OfferPayload(VariablePayload):
    """A model update waiting to be fetched over TCP by ``recipient`` (and only by the holder of its key)."""

    msg_id = 2
    format_list = [
        "varlenHutf8",  # swarm_id
        "Q",  # session
        "Q",  # counter
        "20s",  # offer_id: random, names the blob on the sender
        "q",  # round
        "varlenHutf8",  # sender node id
        "varlenHutf8",  # recipient node id
        "20s",  # recipient key hash (IPv8 mid)
        "Q",  # size in bytes
        "32s",  # sha256 digest
        "varlenHutf8",  # encoding
        "Q",  # sample_count
        "varlenH",  # meta (canonical JSON)
        "H",  # tcp_port to fetch from
    ]
    names = [
        "swarm_id",
        "session",
        "counter",
        "offer_id",
        "round",
        "sender",
        "recipient",
        "recipient_mid",
        "size",
        "digest",
        "encoding",
        "sample_count",
        "meta",
        "tcp_port",
    ]


@vp_compile
class ControlPayload(VariablePayload):
    msg_id = 3
    format_list = ["varlenHutf8", "Q", "Q", "varlenHutf8", "varlenHutf8", "varlenH"]
    names = ["swarm_id", "session", "counter", "recipient", "kind", "body"]


@vp_compile
class ByePayload(VariablePayload):
    """A clean stop: peers report us lost at once instead of after the silence timeout."""

    msg_id = 4
    format_list = ["varlenHutf8", "Q", "Q", "varlenHutf8"]
    names = ["swarm_id", "session", "counter", "node_id"]


@vp_compile
class DeclinePayload(VariablePayload):
    """The recipient will not fetch an offer (too large, malformed, out of date): the sender frees it at once."""

    msg_id = 5
    format_list = ["varlenHutf8", "Q", "Q", "20s", "varlenHutf8"]
    names = ["swarm_id", "session", "counter", "offer_id", "reason"]


@vp_compile
class RevocationPayload(VariablePayload):
    """The creator-signed revocation list a peer holds (JSON, `quinkgl_cli.manifest.admission`), passed on to every
    peer when a newer version is adopted and to each newly met peer."""

    msg_id = 6
    format_list = ["varlenHutf8", "Q", "Q", "varlenH"]
    names = ["swarm_id", "session", "counter", "body"]


@vp_compile
class ServicesPayload(VariablePayload):
    """What a peer tells each of its peers now and then: whether it relays transfers (see `relay`) and the address
    it sees that peer's datagrams come from (how a node learns it sits behind a NAT, and which kind)."""

    msg_id = 7
    format_list = ["varlenHutf8", "Q", "Q", "?", "varlenHutf8", "H"]
    names = ["swarm_id", "session", "counter", "relay", "seen_host", "seen_port"]


@vp_compile
class PathRequestPayload(VariablePayload):
    """From the recipient of an offer it cannot fetch directly, to its sender: bring the offer's bytes by ``path``
    (``reverse``: connect out to the recipient's ``tcp_port``; ``relay``: meet it at the relay peer ``relay``)."""

    msg_id = 8
    format_list = ["varlenHutf8", "Q", "Q", "20s", "varlenHutf8", "varlenHutf8", "H"]
    names = ["swarm_id", "session", "counter", "offer_id", "path", "relay", "tcp_port"]


@vp_compile
class RelayedPayload(VariablePayload):
    """To a relay volunteer (``--relay``): pass ``packet`` on to the peer it knows as ``target``. ``packet`` is a
    whole message of ours (hello, offer, control, ...) signed for that peer: the relay can drop it, never alter it."""

    msg_id = 9
    format_list = ["varlenHutf8", "Q", "Q", "varlenHutf8", "varlenH"]
    names = ["swarm_id", "session", "counter", "target", "packet"]


@vp_compile
class ForwardedPayload(VariablePayload):
    """From a relay: ``packet``, signed by the peer the relay knows as ``origin`` (its replies go back through the
    relay under that name), whose datagrams the relay sees come from ``seen_host:seen_port``."""

    msg_id = 10
    format_list = ["varlenHutf8", "Q", "Q", "varlenHutf8", "varlenHutf8", "H", "varlenH"]
    names = ["swarm_id", "session", "counter", "origin", "seen_host", "seen_port", "packet"]


@vp_compile
class RosterPayload(VariablePayload):
    """From a relay volunteer: some of its peers, by the names it knows them by and their keys, so that peers that
    cannot reach each other directly (a symmetric NAT and a port-restricted one) can meet through it."""

    msg_id = 11
    format_list = ["varlenHutf8", "Q", "Q", "varlenH-list", "varlenH-list"]
    names = ["swarm_id", "session", "counter", "peer_names", "peer_keys"]


@vp_compile
class UdpPullPayload(VariablePayload):
    """From the recipient of an offer no TCP way reaches, to its sender: send the offer's bytes over the UDP way we
    already exchange datagrams on (`udpway`), as transfer ``transfer_id``, encrypted to the key agreed with
    ``ephemeral`` (the recipient's X25519 key, vouched for by this message's signature)."""

    msg_id = 12
    format_list = ["varlenHutf8", "Q", "Q", "20s", "Q", "32s"]  # the transfer id as a little-endian u64
    names = ["swarm_id", "session", "counter", "offer_id", "transfer_id", "ephemeral"]


@vp_compile
class BusyPayload(VariablePayload):
    """From the sender of an offer, to the recipient that asked for it by ``path`` (a `UdpPullPayload` or a
    `PathRequestPayload`): too busy to serve it now, ask again in ``retry_ms`` (`busy`)."""

    msg_id = 13
    format_list = ["varlenHutf8", "Q", "Q", "20s", "varlenHutf8", "I"]
    names = ["swarm_id", "session", "counter", "offer_id", "path", "retry_ms"]
