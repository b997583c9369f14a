"""The datagrams of a model transfer over the punched UDP way (`udpway`): their layout, and the transfer's keys.

A transfer is asked for by the recipient in a signed `UdpPullPayload` (offer id, a random 8-byte transfer id, an
ephemeral X25519 key); the sender answers on the same UDP sockets the peers already exchange datagrams on (so they
pass the NATs as the control messages do). The few control datagrams are sealed again by the endpoint with the
swarm key (`seal`), like every IPv8 datagram::

    START  b"QGLU" 0x01  tid(8)  sender's ephemeral X25519 key (32)
    ACK    b"QGLU" 0x03  tid(8)  ChaCha20-Poly1305(k_ack, nonce=counter u64, cum u32 || bitmap, ad=header+counter)
    ABORT  b"QGLU" 0x04  tid(8)  ChaCha20-Poly1305(k_ack, nonce=counter u64, b"", ad=header+counter)

The chunks, nearly all of a transfer's datagrams, are sealed once, under the transfer's own key only, and look on
the wire as a swarm-sealed datagram does (`seal`: a 12-byte nonce, then ciphertext and tag)::

    DATA   nonce = prefix(4) || (transmission | PUSH) u32 || seq u32   (PUSH: the top bit)
           ChaCha20-Poly1305(k_data, nonce, chunk, ad=DATA_AD)

``prefix`` is drawn at random per transfer, the transmission counter never repeats under one key (so no nonce
does, a chunk sent again included), and PUSH marks the last datagram of a burst (acknowledge at once). The nonce is
bound by the tag like the rest: whoever lacks ``k_data`` can neither forge a chunk nor move one to another place.
Sealing the chunks with the swarm key too cost a third of a datagram's cryptography on each side and hid nothing
more: the recipient's endpoint tries the keys of the transfers it runs from the datagram's source address before
the swarm key (`udprecv.UdpReceiver.take`), and a datagram none opens goes on to the swarm seal and IPv8.

``chunk`` is ``CHUNK`` bytes of the model (the last one the rest): a datagram of 1,260 bytes on the wire, inside
the 1,280-byte MTU every IPv4 path carries without fragments. An ACK says every chunk below ``cum`` arrived and,
bit ``i`` of ``bitmap``, chunk ``cum + 1 + i`` too (selective acknowledgements over the whole ``WINDOW``).

The keys come from HKDF-SHA256 over the X25519 secret, bound to the swarm's community, the offer, the transfer id
and both ephemeral keys; the recipient's ephemeral key is in its signed request, so only the recipient can read the
bytes (a stranger who swaps the START's key gets the recipient to derive a key the sender does not hold: nothing
opens). The bytes must still match the digest of the offer the sender signed. The ``MAGIC`` can never start an
IPv8 packet (those start with 0x0002), so the endpoint tells the two apart after opening the swarm seal.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from quinkgl_cli.transport.ipv8.channel import KEY_BYTES, ChannelError, Ephemeral

MAGIC = b"QGLU"
START, ACK, ABORT = 1, 3, 4
TID_BYTES = 8
HEAD = struct.Struct(f"<4sB{TID_BYTES}s")  # magic, kind, transfer id
SEQ = struct.Struct("<I")
COUNTER = struct.Struct("<Q")
CUM = struct.Struct("<I")
NONCE_BYTES = 12
NONCE_TAIL = struct.Struct("<II")  # (transmission | PUSH), seq: after the random prefix
PREFIX_BYTES = NONCE_BYTES - NONCE_TAIL.size
PUSH = 1 << 31
DATA_OVERHEAD = NONCE_BYTES + 16  # nonce and tag around a chunk
CHUNK = 1232  # model bytes per datagram
WINDOW = 512  # chunks in flight at most, and the span an ACK's bitmap covers
BITMAP_BYTES = WINDOW // 8
TAG = 16
EPHEMERAL_BYTES = 32
_INFO = b"quinkgl-udp/2 keys\0"
DATA_AD = b"quinkgl-udp/2 data"
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
    if magic != MAGIC or kind not in (START, ACK, ABORT):
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
        self._data_sent = 0  # chunk datagrams sealed: the nonce's counter
        self._prefix = os.urandom(PREFIX_BYTES)
        self.acks_seen = -1  # the highest ack counter opened: an older (replayed or overtaken) ack is stale

    @classmethod
    def derive(cls, mine: Ephemeral, theirs: bytes, context: bytes, tid: bytes) -> TransferKeys:
        """Both keys, from our ephemeral key and the other end's; ``context`` binds swarm and offer."""
        if len(theirs) != EPHEMERAL_BYTES:
            raise ChannelError("bad_key_exchange")
        return cls(mine.derive_bytes(theirs, tid, context, 2 * KEY_BYTES, _INFO))

    # -- data (sender -> recipient) ------------------------------------------------------------------------------
    def data(self, seq: int, chunk: bytes | bytearray | memoryview, push: bool = False) -> bytes:
        """A chunk's datagram, whole: nothing more seals it (the endpoint sends it as it is)."""
        sent = self._data_sent
        if sent >= PUSH:  # 2^31 transmissions: far past any model's deadline, but a nonce must never repeat
            raise WireError("exhausted")
        self._data_sent = sent + 1
        nonce = self._prefix + NONCE_TAIL.pack(sent | (PUSH if push else 0), seq)
        return nonce + self._data.encrypt(nonce, chunk, DATA_AD)

    def open_data_into(self, datagram: bytes, into: memoryview) -> bool:
        """Decrypt a chunk's datagram straight into ``into`` (exactly the chunk's length); False when it does not
        open under our key, and then ``into`` holds garbage: only ever aim it at a place no chunk filled yet."""
        try:
            self._data.decrypt_into(datagram[:NONCE_BYTES], memoryview(datagram)[NONCE_BYTES:], DATA_AD, into)
        except InvalidTag:
            return False
        return True

    def open_data(self, datagram: bytes) -> bytes | None:
        """The chunk in a chunk's datagram, None when it does not open under our key."""
        try:
            return self._data.decrypt(datagram[:NONCE_BYTES], memoryview(datagram)[NONCE_BYTES:], DATA_AD)
        except InvalidTag:
            return None

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


def data_tail(datagram: bytes) -> tuple[bool, int] | None:
    """(PUSH, seq) from a chunk's nonce, as the datagram claims them (trusted only once it opened); None when too
    short to be a chunk's."""
    if len(datagram) < DATA_OVERHEAD:
        return None
    flags, seq = NONCE_TAIL.unpack_from(datagram, PREFIX_BYTES)
    return flags >= PUSH, seq


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "little")
