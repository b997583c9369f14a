"""Every datagram of a swarm, sealed with the swarm key: what crosses the network is a random nonce and ciphertext.

On the wire a datagram is ``nonce (12 bytes) || ChaCha20-Poly1305(packet) (len(packet) + 16 bytes)``, under a key
derived from the swarm key (`manifest.swarmkey`) with a fresh nonce each time and ``AD`` (the wire version) as
associated data. The sealed packet is IPv8's own, whole: the community prefix, the message id, the signed
payload and its signature; so once opened, the signature, session and replay checks run on it as before. Nothing
is in clear: no community id, no key, no swarm id. A datagram that does not open (another swarm's, an older
version's cleartext, altered, or noise) is dropped before any parsing (`endpoint`).

A nonce is a random 8-byte prefix, drawn when the seal is made and again every 2^32 datagrams, and a 4-byte counter:
no seal repeats its own nonces, and two seals (two processes of a swarm) share one only if their random prefixes
meet, a chance of about s^2 / 2^65 for ``s`` prefixes ever drawn in the swarm. A repeat would expose two
plaintexts' XOR, not the key, and forging still needs a peer's signature. (A random nonce per datagram was one
system call each: a tenth of a UDP transfer's sending cost, `udpway`.) Seal on one thread only (the event loop's).

The one kind of datagram this seal does not wrap is a model's chunk sent over UDP (`udpwire`): it is sealed under
its transfer's own key instead (only the two ends hold it), in the same shape, a 12-byte nonce and
ChaCha20-Poly1305 ciphertext, so nothing is in clear there either and an outsider can neither read nor forge one;
sealing it twice cost a third of each end's per-datagram cryptography and hid nothing more.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from quinkgl_cli.errors import NetworkError
from quinkgl_cli.manifest import swarmkey

AD = b"quinkgl-datagram/1"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
COUNTER_BYTES = 4


class DatagramSeal:
    def __init__(self, swarm_key: bytes) -> None:
        if len(swarm_key) != swarmkey.KEY_BYTES:
            raise NetworkError(f"a swarm key has {swarmkey.KEY_BYTES} bytes, not {len(swarm_key)}")
        self._aead = ChaCha20Poly1305(swarmkey.derive(swarm_key, b"datagrams"))
        self._prefix = os.urandom(NONCE_BYTES - COUNTER_BYTES)
        self._count = 0

    def seal(self, packet: bytes) -> bytes:
        if self._count >= 1 << (8 * COUNTER_BYTES):
            self._prefix, self._count = os.urandom(NONCE_BYTES - COUNTER_BYTES), 0
        nonce = self._prefix + self._count.to_bytes(COUNTER_BYTES, "little")
        self._count += 1
        return nonce + self._aead.encrypt(nonce, packet, AD)

    def open(self, datagram: bytes) -> bytes | None:
        """The packet sealed in ``datagram``, or None when it was not sealed with this swarm's key (or altered)."""
        if len(datagram) <= OVERHEAD:
            return None
        try:
            return self._aead.decrypt(datagram[:NONCE_BYTES], datagram[NONCE_BYTES:], AD)
        except InvalidTag:
            return None
