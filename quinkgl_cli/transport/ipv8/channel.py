"""Confidentiality of the model channel: the key a fetch's bytes are encrypted with, and the framing.

Each fetch agrees a fresh key: the server's challenge carries an ephemeral X25519 public key, the fetcher's
request carries its own, and the fetcher signs both (with the challenge, the offer id and the server's IPv8 key;
see `stream.fetch_statement`) with the recipient's IPv8 key. The server serves only after checking that
signature, so the other end of its key exchange is the recipient itself, not someone in the middle who swapped an
ephemeral key (the signature would not cover it). Both sides derive the key with HKDF-SHA256 from the X25519
shared secret, salted with the challenge and bound to the swarm, offer and both ephemeral keys; the ephemeral keys
are dropped after the fetch (forward secrecy). The bytes travel as ChaCha20-Poly1305 frames of ``FRAME`` bytes
of plaintext, numbered by their nonce, so a frame altered, dropped, reordered or cut short fails to open. The
fetcher needs no proof of the server's identity for confidentiality (it sends nothing secret) nor for integrity
(the bytes must match the digest of the offer the sender signed).

There is no cleartext mode: a peer speaking another version of the channel is refused, never downgraded.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRAME = 256 * 1024  # plaintext bytes per sealed frame
TAG = 16  # Poly1305 tag after each frame
KEY_BYTES = 32
_INFO = b"quinkgl-fetch/2 key\0"


class ChannelError(Exception):
    """The key exchange or a frame failed; ``reason`` is the word logged beside the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def frame_count(size: int) -> int:
    return -(-size // FRAME)


def sealed_size(size: int) -> int:
    """Bytes on the wire for ``size`` bytes of plaintext."""
    return size + TAG * frame_count(size)


class Ephemeral:
    """One side's X25519 key for one fetch."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def derive(self, peer_public: bytes, salt: bytes, context: bytes) -> bytes:
        """The fetch's key from our private half and the peer's public key; ``context`` names what it is for."""
        return self.derive_bytes(peer_public, salt, context, KEY_BYTES, _INFO)

    def derive_bytes(self, peer_public: bytes, salt: bytes, context: bytes, length: int, info: bytes) -> bytes:
        """``length`` bytes of key from the exchange, for the use ``info`` names (a UDP transfer takes two keys)."""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a low-order point gives an all-zero secret: refused by the library
            raise ChannelError("bad_key_exchange") from exc
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info + context).derive(shared)


def context(community_id: bytes, offer_id: bytes, server_public: bytes, client_public: bytes) -> bytes:
    return community_id + offer_id + server_public + client_public


class Sealer:
    """Encrypts one payload's frames in order."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._next = 0

    def frames(self, payload: bytes | bytearray | memoryview) -> Iterator[bytes]:
        view = memoryview(payload).cast("B")
        for start in range(0, view.nbytes, FRAME):
            yield self.seal(view[start : start + FRAME])

    def seal(self, chunk: bytes | bytearray | memoryview) -> bytes:
        nonce = self._next.to_bytes(12, "big")
        self._next += 1
        return self._aead.encrypt(nonce, chunk, None)


class Opener:
    """Decrypts one payload's frames in order; a frame that fails to open is ChannelError('bad_frame')."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._next = 0

    def open(self, frame: bytes | bytearray | memoryview) -> bytes:
        nonce = self._next.to_bytes(12, "big")
        self._next += 1
        try:
            return self._aead.decrypt(nonce, frame, None)
        except InvalidTag as exc:
            raise ChannelError("bad_frame") from exc

    def open_all(self, sealed: bytes | bytearray | memoryview, size: int) -> bytearray:
        """The ``size`` plaintext bytes of a whole sealed payload."""
        out = bytearray(size)
        view = memoryview(sealed)
        at = 0
        for start in range(0, size, FRAME):
            n = min(FRAME, size - start)
            out[start : start + n] = self.open(view[at : at + n + TAG])
            at += n + TAG
        return out
