"""The swarm key: the 32-byte secret every datagram of a swarm is sealed with (`transport.ipv8.seal`).

Who holds it decides who can read and write the swarm's control traffic, so it follows membership:

- certified swarm: derived from the creator's private key and the swarm id, so `quinkgl admit` gives every
  certificate file the same key without keeping any state; only the creator and the nodes it admitted hold it.
  A manifest (public) and a swarm id (in logs) give nothing.
- open swarm: derived from the manifest's canonical bytes and its signature: whoever holds the manifest may
  join (that is what open means), whoever knows only the swarm id or a captured datagram cannot.
- ``for_swarm_id``: tests and embedders that run a transport without a manifest; it hides traffic only from
  whoever does not know the swarm id, and no daemon uses it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_CERTIFIED = b"quinkgl swarm key/certified/1"
_OPEN = b"quinkgl swarm key/open/1"
_ID_ONLY = b"quinkgl swarm key/id-only/1"


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def certified(creator: Ed25519PrivateKey, swarm_id: str) -> bytes:
    """The key `quinkgl admit` puts in every certificate file of the swarm ``swarm_id``."""
    seed = creator.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _hkdf(seed, swarm_id.encode("utf-8"), _CERTIFIED)


def open_swarm(canonical: bytes, signature: str | None) -> bytes:
    """The key of an open swarm: its manifest's canonical bytes and signature (empty when unsigned)."""
    return _hkdf(canonical + b"\0" + (signature or "").encode("ascii"), b"", _OPEN)


def for_swarm_id(swarm_id: str) -> bytes:
    return _hkdf(swarm_id.encode("utf-8"), b"", _ID_ONLY)


def derive(swarm_key: bytes, purpose: bytes, length: int = KEY_BYTES) -> bytes:
    """A subkey (or identifier) of ``swarm_key`` for one purpose: keys for different jobs never coincide."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"quinkgl", info=purpose).derive(swarm_key)
