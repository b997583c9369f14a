"""Ed25519 signatures over a manifest's canonical bytes.

The signed bytes include ``creator_pubkey``: a signature binds the creator's identity as well as the content,
so swapping in another key's name breaks it and a re-signed manifest is a different swarm (another swarm id).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError
from quinkgl_cli.manifest.canonical import canonical_bytes
from quinkgl_cli.manifest.schema import Manifest


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """A copy of ``manifest`` naming ``key``'s public half as creator and signed by ``key``."""
    unsigned = manifest.model_copy(update={"creator_pubkey": keys.public_key_text(key), "signature": None})
    signature = key.sign(canonical_bytes(unsigned)).hex()
    return unsigned.model_copy(update={"signature": signature})


def verify_signature(canonical: bytes, creator_pubkey: str | None, signature: str | None, source: str = "manifest") -> bool:
    """True when ``signature`` is ``creator_pubkey``'s valid signature of ``canonical``; False when both are absent.

    Half a signature (a creator key without signature, or the reverse) and an invalid signature are CryptoError (3):
    a manifest that claims a creator must prove it, under every trust policy.
    """
    if signature is None and creator_pubkey is None:
        return False
    if signature is None:
        raise CryptoError(
            f"{source} names creator {creator_pubkey} but carries no signature (stripped?)",
            "get the signed manifest from its creator",
        )
    if creator_pubkey is None:
        raise CryptoError(f"{source} carries a signature but no creator_pubkey", "get the signed manifest from its creator")
    public = keys.parse_public_key(creator_pubkey)
    try:
        public.verify(bytes.fromhex(signature), canonical)
    except (InvalidSignature, ValueError) as exc:
        raise CryptoError(
            f"{source} signature is not valid for creator {creator_pubkey}: the manifest was altered or signed by another key",
            "do not use this file; get the manifest again from its creator",
        ) from exc
    return True
