"""The signed messages of a swarm community. Compiled VariablePayloads: cheap to build on hot paths.

Every one of them travels signed (``ez_send``) and is checked by ``lazy_wrapper``, so the sender's key is known.
The swarm id and the intended recipient sit inside the signed bytes: IPv8 has no replay protection of its own.
"""

from __future__ import annotations

from ipv8.messaging.lazy_payload import VariablePayload, vp_compile


@vp_compile
class HelloPayload(VariablePayload):
    """Who I am and what I run; ``want_reply`` on first contact so the other side answers at once.

    ``session`` is random per start: a peer that crashed and came back within the silence timeout is seen as
    restarted (its round numbers may go back to a checkpoint's) rather than as the same run.
    """

    msg_id = 1
    format_list = ["varlenHutf8", "varlenHutf8", "varlenHutf8", "H", "H", "Q", "?"]
    names = ["swarm_id", "node_id", "arch_hash", "protocol", "tcp_port", "session", "want_reply"]


@vp_compile
class OfferPayload(VariablePayload):
    """A model update waiting to be fetched over TCP by ``recipient`` (and only by the holder of its key)."""

    msg_id = 2
    format_list = [
        "varlenHutf8",  # swarm_id
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
    format_list = ["varlenHutf8", "varlenHutf8", "varlenHutf8", "varlenH"]
    names = ["swarm_id", "recipient", "kind", "body"]


@vp_compile
class ByePayload(VariablePayload):
    """A clean stop: peers report us lost at once instead of after the silence timeout."""

    msg_id = 4
    format_list = ["varlenHutf8", "varlenHutf8"]
    names = ["swarm_id", "node_id"]


@vp_compile
class DeclinePayload(VariablePayload):
    """The recipient will not fetch an offer (too large, malformed, out of date): the sender frees it at once."""

    msg_id = 5
    format_list = ["varlenHutf8", "20s", "varlenHutf8"]
    names = ["swarm_id", "offer_id", "reason"]
