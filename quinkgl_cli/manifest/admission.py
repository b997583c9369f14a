"""Admission documents of a swarm, both signed by the manifest's creator key: certificates and revocation lists.

A certificate binds one node's transport public key and its node id to one swarm id, until it expires. A
revocation list (a version number and the fingerprints of revoked node keys) withdraws certificates; a higher
version replaces a lower one. Both are small JSON objects signed like manifests: Ed25519 over the RFC 8785 bytes
of everything but ``signature``, as read (the raw object, not a re-dump), with a ``kind`` inside the signed bytes
so one kind of document can never pass for another (or for a manifest).

Checks return a stable reason word (``expired``, ``wrong_swarm``, ...) rather than raising: the transport logs
the word beside the refused key, and start-up turns it into the error a user reads (`problem_error`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field, ValidationError, field_validator

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError, QuinkglError, TrustError, UsageError
from quinkgl_cli.jsonsafe import loads_strict
from quinkgl_cli.manifest.canonical import canonical_bytes
from quinkgl_cli.manifest.schema import HASH_PATTERN, MAX_JSON_INT, PUBKEY_PATTERN, Strict, error_text

CERTIFICATE_KIND: Literal["quinkgl-certificate/1"] = "quinkgl-certificate/1"
REVOCATIONS_KIND: Literal["quinkgl-revocations/1"] = "quinkgl-revocations/1"
# An IPv8 curve25519 public key as `key_to_bin()` gives it: b"LibNaCLPK:" + X25519 key + Ed25519 key, in hex.
NODE_KEY_PATTERN = r"^4c69624e61434c504b3a[0-9a-f]{128}$"
FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_DOCUMENT_BYTES = 48 * 1024  # a revocation list travels in one datagram
MAX_REVOKED = 512  # ~38 KB of fingerprints: fits one datagram with IPv8's headers
SWARM_KEY_FIELD = "swarm_key"  # in a certificate file only (`certificate_file`), never in what a hello carries
CLOCK_SKEW = timedelta(hours=1)  # how far in our future an ``issued_at`` may lie (clocks drift)


class Certificate(Strict):
    kind: Literal["quinkgl-certificate/1"] = CERTIFICATE_KIND
    swarm_id: str = Field(pattern=HASH_PATTERN)
    node_id: str = Field(pattern=NODE_ID_PATTERN)
    node_key: str = Field(pattern=NODE_KEY_PATTERN)
    issued_at: datetime
    expires_at: datetime | None = None
    creator_pubkey: str | None = Field(default=None, pattern=PUBKEY_PATTERN)
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return _aware(value)


class RevocationList(Strict):
    kind: Literal["quinkgl-revocations/1"] = REVOCATIONS_KIND
    swarm_id: str = Field(pattern=HASH_PATTERN)
    version: int = Field(ge=1, le=MAX_JSON_INT)
    issued_at: datetime
    revoked: tuple[str, ...] = Field(default=(), max_length=MAX_REVOKED)  # fingerprints of node keys
    creator_pubkey: str | None = Field(default=None, pattern=PUBKEY_PATTERN)
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @field_validator("issued_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return _aware(value)  # type: ignore[return-value]

    @field_validator("revoked")
    @classmethod
    def _fingerprints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not re.match(FINGERPRINT_PATTERN, item):
                raise ValueError(f"{item[:80]!r} is not sha256:<64 hex> of a node key")
        if len(set(value)) != len(value):
            raise ValueError("a key is listed twice")
        return value


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (e.g. 2026-12-31T00:00:00Z)")
    return value


@dataclass(frozen=True)
class Signed:
    """A parsed document, the raw object it was read from and the canonical bytes its signature covers."""

    document: Any  # Certificate | RevocationList
    raw: dict[str, Any]
    canonical: bytes

    def text(self) -> bytes:
        """The raw object as one compact JSON line (what a file holds and a hello or gossip message carries)."""
        return json.dumps(self.raw, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def fingerprint(node_key: bytes | str) -> str:
    """``sha256:<hex>`` of a node's transport public key (bytes, or their hex)."""
    raw = bytes.fromhex(node_key) if isinstance(node_key, str) else node_key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def normalize_node_key(text: str) -> str:
    """A node key as `quinkgl node-key` prints it (hex of the IPv8 public key), lowercased; UsageError otherwise."""
    value = text.strip().lower()
    if not re.match(NODE_KEY_PATTERN, value):
        raise UsageError(f"{text.strip()[:40]!r}... is not a node key" if len(text.strip()) > 40 else f"{text.strip()!r} is not a node key",
                         "give the hex line `quinkgl node-key --node-id ID --manifest MANIFEST` prints on the node (or a file holding it)")
    return value


def sign(document: Any, key: Ed25519PrivateKey) -> Signed:
    """``document`` naming ``key``'s public half as creator, signed by it."""
    unsigned = document.model_copy(update={"creator_pubkey": keys.public_key_text(key), "signature": None})
    raw = unsigned.model_dump(mode="json")
    canonical = canonical_bytes(raw)
    signed = unsigned.model_copy(update={"signature": key.sign(canonical).hex()})
    return Signed(signed, signed.model_dump(mode="json"), canonical)


def parse(data: bytes, cls: type[Certificate] | type[RevocationList], source: str) -> Signed:
    """A document of type ``cls`` from JSON bytes; UsageError (1) naming what is wrong. The signature is not
    checked here (see `signature_valid`)."""
    what = "certificate" if cls is Certificate else "revocation list"
    if len(data) > MAX_DOCUMENT_BYTES:
        raise UsageError(f"{source} is larger than {MAX_DOCUMENT_BYTES // 1024} KiB", f"this is not a {what}")
    try:
        raw = loads_strict(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise UsageError(f"{source} is not valid JSON: {str(exc)[:120]}", f"a {what} is a JSON file") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{source} is not a JSON object", f"a {what} is one JSON object")
    try:
        document = cls.model_validate_json(data, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise UsageError(f"{source}: field {where}: {error_text(err)}", f"is this a {what} made by `quinkgl admit`/`revoke`?") from exc
    return Signed(document, raw, canonical_bytes(raw))


def certificate_file(signed: Signed, swarm_key: bytes) -> bytes:
    """What `quinkgl admit` writes: the signed certificate's fields and the swarm key (hex, ``SWARM_KEY_FIELD``),
    which its signature does not cover. The key stays on the node: a hello carries `Signed.text()`, without it, and
    a certificate that arrives with one is refused as malformed."""
    raw = {**signed.raw, SWARM_KEY_FIELD: swarm_key.hex()}
    return json.dumps(raw, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_certificate_file(data: bytes, source: str) -> tuple[Signed, bytes | None]:
    """A certificate file: the certificate, and the swarm key it holds (None in a file made before keys were
    issued); UsageError (1) naming what is wrong."""
    try:
        raw = loads_strict(data[: MAX_DOCUMENT_BYTES + 1].decode("utf-8"))
    except ValueError:
        raw = None  # `parse` says what is wrong with it
    if not isinstance(raw, dict) or SWARM_KEY_FIELD not in raw:
        return parse(data, Certificate, source), None
    text = raw.pop(SWARM_KEY_FIELD)
    if not isinstance(text, str) or not re.match(r"^[0-9a-f]{64}$", text):
        raise UsageError(f"{source}: field {SWARM_KEY_FIELD}: not 64 hex digits", "is this a certificate made by `quinkgl admit`?")
    return parse(json.dumps(raw, ensure_ascii=False).encode("utf-8"), Certificate, source), bytes.fromhex(text)


def signature_valid(signed: Signed, creator_pubkey: str) -> bool:
    doc = signed.document
    if doc.signature is None or doc.creator_pubkey != creator_pubkey:
        return False
    try:
        keys.parse_public_key(creator_pubkey).verify(bytes.fromhex(doc.signature), signed.canonical)
    except (InvalidSignature, ValueError, UsageError):
        return False
    return True


def certificate_problem(signed: Signed, *, swarm_id: str, creator_pubkey: str, node_key: str, node_id: str,
                        now: datetime, revoked: frozenset[str] = frozenset()) -> str | None:
    """Why ``signed`` does not admit ``node_id`` with ``node_key`` (hex) to the swarm now, or None."""
    cert = signed.document
    if not isinstance(cert, Certificate):
        return "not_a_certificate"
    if cert.swarm_id != swarm_id:
        return "wrong_swarm"
    if cert.creator_pubkey != creator_pubkey:
        return "wrong_creator"
    if not signature_valid(signed, creator_pubkey):
        return "bad_signature"
    if cert.node_key != node_key:
        return "wrong_key"
    if cert.node_id != node_id:
        return "wrong_node_id"
    if cert.issued_at - now > CLOCK_SKEW:
        return "not_yet_valid"
    if cert.expires_at is not None and now > cert.expires_at:
        return "expired"
    if fingerprint(cert.node_key) in revoked:
        return "revoked"
    return None


def revocations_problem(signed: Signed, *, swarm_id: str, creator_pubkey: str | None) -> str | None:
    """Why ``signed`` is not a revocation list of this swarm's creator, or None."""
    doc = signed.document
    if not isinstance(doc, RevocationList):
        return "not_a_revocation_list"
    if creator_pubkey is None:
        return "unsigned_swarm"
    if doc.swarm_id != swarm_id:
        return "wrong_swarm"
    if doc.creator_pubkey != creator_pubkey:
        return "wrong_creator"
    if not signature_valid(signed, creator_pubkey):
        return "bad_signature"
    return None


_EXPLAINED = {
    "wrong_swarm": "it was issued for another swarm (another manifest)",
    "wrong_creator": "it was signed by another key than the manifest's creator",
    "bad_signature": "its signature is not valid (altered, or not made by `quinkgl admit`)",
    "wrong_key": "it names another node key than this node's (see `quinkgl node-key --node-id ID --manifest MANIFEST`)",
    "wrong_node_id": "it was issued for another --node-id",
    "not_yet_valid": "it is dated more than an hour after this machine's clock",
    "expired": "it has expired",
    "revoked": "the swarm's creator revoked this node's key",
    "unsigned_swarm": "the manifest is unsigned, so nobody can sign for its swarm",
}


def explain(reason: str) -> str:
    return _EXPLAINED.get(reason, reason)


def problem_error(reason: str, source: str) -> QuinkglError:
    """The start-up error for a document refused with ``reason``: a bad signature is a crypto problem (3), the rest
    are refusals of trust (4)."""
    text = f"{source} is not valid here: {explain(reason)}"
    if reason == "bad_signature":
        return CryptoError(text, "ask the swarm's creator for a new one")
    return TrustError(text, "ask the swarm's creator for a new one, made with `quinkgl admit`")
