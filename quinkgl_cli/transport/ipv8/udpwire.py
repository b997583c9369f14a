"""The datagrams of a model transfer over the punched UDP way (`udpway`): their layout, and the transfer's keys.

A transfer is asked for by the recipient in a signed `UdpPullPayload` (offer id, a random 8-byte transfer id, an
ephemeral X25519 key); the sender answers on the same UDP sockets the peers already exchange datagrams on (so they
pass the NATs as the control messages do), every datagram sealed again by the endpoint with the swarm key (`seal`)::

    START  b"QGLU" 0x01  tid(8)  sender's ephemeral X25519 key (32)
    DATA   b"QGLU" 0x02  tid(8)  seq u32  ChaCha20-Poly1305(k_data, nonce=seq, chunk, ad=header)
           (kind 0x05, PUSH, for the last datagram of a burst: acknowledge at once)
    ACK    b"QGLU" 0x03  tid(8)  ChaCha20-Poly1305(k_ack, nonce=counter u64, cum u32 || bitmap, ad=header+counter)
    ABORT  b"QGLU" 0x04  tid(8)  ChaCha20-Poly1305(k_ack, nonce=counter u64, b"", ad=header+counter)

``chunk`` is ``CHUNK`` bytes of the model (the last one the rest): a datagram of 1,261 bytes on the wire, inside
the 1,280-byte MTU every IPv4 path carries without fragments. An ACK says every chunk below ``cum`` arrived and,
bit ``i`` of ``bitmap``, chunk ``cum + 1 + i`` too (selective acknowledgements over the whole ``WINDOW``).

The keys come from HKDF-SHA256 over the X25519 secret, bound to the swarm's community, the offer, the transfer id
and both ephemeral keys; the recipient's ephemeral key is in its signed request, so only the recipient can read the
bytes (a stranger who swaps the START's key gets the recipient to derive a key the sender does not hold: nothing
opens). The bytes must still match the digest of the offer the sender signed. The ``MAGIC`` can never start an
IPv8 packet (those start with 0x0002), so the endpoint tells the two apart after opening the swarm seal.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from quinkgl_cli.transport.ipv8.channel import KEY_BYTES, ChannelError, Ephemeral

MAGIC = b"QGLU"
START, DATA, ACK, ABORT, PUSH = 1, 2, 3, 4, 5
TID_BYTES = 8
HEAD = struct.Struct(f"<4sB{TID_BYTES}s")  # magic, kind, transfer id
SEQ = struct.Struct("<I")
COUNTER = struct.Struct("<Q")
CUM = struct.Struct("<I")
CHUNK = 1200  # model bytes per datagram
WINDOW = 512  # chunks in flight at most, and the span an ACK's bitmap covers
BITMAP_BYTES = WINDOW // 8
TAG = 16
EPHEMERAL_BYTES = 32
_INFO = b"quinkgl-udp/1 keys\0"
_BITS = bytes.maketrans(b"\x00\x01", b"01")


class WireError(Exception):
    """A datagram that is not a well-formed transfer datagram; ``reason`` is the word counted for it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def chunks(size: int) -> int:
    """Datagrams a model of ``size`` bytes takes (one even for an empty model: its end must be acknowledged)."""
    return max(1, -(-size // CHUNK))


def chunk_span(seq: int, size: int) -> tuple[int, int]:
    start = seq * CHUNK
    return start, min(start + CHUNK, size)


def head(packet: bytes) -> tuple[int, bytes]:
    """The kind and transfer id of a transfer datagram; WireError when it is none."""
    if len(packet) < HEAD.size:
        raise WireError("short")
    magic, kind, tid = HEAD.unpack_from(packet)
    if magic != MAGIC or kind not in (START, DATA, ACK, ABORT, PUSH):
        raise WireError("malformed")
    return kind, tid


def bits(flags: bytes | bytearray | memoryview) -> int:
    """An int whose bit ``i`` is set when ``flags[i]`` is 1 (a bytes of 0s and 1s), computed in C."""
    text = bytes(flags).translate(_BITS)[::-1]
    return int(text, 2) if text else 0


class TransferKeys:
    """One transfer's two keys: the sender's for the data, the recipient's for its acknowledgements."""

    def __init__(self, secret: bytes) -> None:
        self._data = ChaCha20Poly1305(secret[:KEY_BYTES])
        self._ack = ChaCha20Poly1305(secret[KEY_BYTES:])
        self._acks_sent = 0
        self.acks_seen = -1  # the highest ack counter opened: an older (replayed or overtaken) ack is stale

    @classmethod
    def derive(cls, mine: Ephemeral, theirs: bytes, context: bytes, tid: bytes) -> TransferKeys:
        """Both keys, from our ephemeral key and the other end's; ``context`` binds swarm and offer."""
        if len(theirs) != EPHEMERAL_BYTES:
            raise ChannelError("bad_key_exchange")
        return cls(mine.derive_bytes(theirs, tid, context, 2 * KEY_BYTES, _INFO))

    # -- data (sender -> recipient) ------------------------------------------------------------------------------
    def data(self, tid: bytes, seq: int, chunk: bytes | bytearray | memoryview, push: bool = False) -> bytes:
        header = HEAD.pack(MAGIC, PUSH if push else DATA, tid) + SEQ.pack(seq)
        return header + self._data.encrypt(_nonce(seq), bytes(chunk), header)

    def open_data(self, packet: bytes) -> tuple[int, bytes]:
        """The sequence number and chunk of a DATA datagram; WireError when it does not open."""
        at = HEAD.size + SEQ.size
        if len(packet) < at + TAG:
            raise WireError("short")
        (seq,) = SEQ.unpack_from(packet, HEAD.size)
        try:
            return seq, self._data.decrypt(_nonce(seq), packet[at:], packet[:at])
        except InvalidTag:
            raise WireError("bad_tag") from None

    # -- acknowledgements (recipient -> sender) ------------------------------------------------------------------
    def ack(self, tid: bytes, cum: int, bitmap: bytes) -> bytes:
        return self._sealed(ACK, tid, CUM.pack(cum) + bitmap)

    def abort(self, tid: bytes) -> bytes:
        return self._sealed(ABORT, tid, b"")

    def _sealed(self, kind: int, tid: bytes, body: bytes) -> bytes:
        header = HEAD.pack(MAGIC, kind, tid) + COUNTER.pack(self._acks_sent)
        nonce = _nonce(self._acks_sent)
        self._acks_sent += 1
        return header + self._ack.encrypt(nonce, body, header)

    def open_ack(self, packet: bytes) -> tuple[int, int] | None:
        """``(cum, bitmap as an int)`` of an ACK, None for an ABORT; WireError when it does not open or is stale."""
        at = HEAD.size + COUNTER.size
        if len(packet) < at + TAG:
            raise WireError("short")
        (counter,) = COUNTER.unpack_from(packet, HEAD.size)
        try:
            body = self._ack.decrypt(_nonce(counter), packet[at:], packet[:at])
        except InvalidTag:
            raise WireError("bad_tag") from None
        if counter <= self.acks_seen:
            raise WireError("stale")
        self.acks_seen = counter
        if packet[4] == ABORT:
            return None
        if len(body) != CUM.size + BITMAP_BYTES:
            raise WireError("malformed")
        return CUM.unpack_from(body)[0], int.from_bytes(body[CUM.size:], "little")


def start(tid: bytes, ephemeral: bytes) -> bytes:
    return HEAD.pack(MAGIC, START, tid) + ephemeral


def start_key(packet: bytes) -> bytes:
    """The sender's ephemeral key in a START; WireError when the datagram has none."""
    if len(packet) != HEAD.size + EPHEMERAL_BYTES:
        raise WireError("malformed")
    return packet[HEAD.size:]


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "little")
