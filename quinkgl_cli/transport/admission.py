"""Who may be a peer: the swarm's membership rule (open or certified) and the revocation list in force.

Owns the revocation list: the newest version heard (from the operator's file, read again when it changes, or
from peers by gossip) replaces an older one and is written to ``store``, so a restart keeps it. Membership asks
`refusal` about every hello before doing anything else with it, and the fetch server asks `revoked` about every
recipient. In a certified swarm a hello must carry a certificate the manifest's creator signed for the sender's
key and node id in this swarm, unexpired and not revoked; in an open swarm only revocation applies (and only when
the manifest is signed: an unsigned one has nobody to sign a list).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import NetworkError, QuinkglError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey

log = logging.getLogger("quinkgl.transport")
MAX_CERTIFICATE_BYTES = 4096  # a certificate is ~600 bytes; more in a hello is not one
_PARSED_CACHE = 1024


@dataclass(frozen=True)
class AdmissionSettings:
    swarm_id: str
    creator_pubkey: str | None  # None: an unsigned (open) swarm, where nothing can be revoked
    certified: bool = False
    certificate: bytes = b""  # ours, carried by every hello we send (certified swarms)
    revocations: docs.Signed | None = None  # the newest list known at start
    store: Path | None = None  # where the newest adopted list is written
    watch: Path | None = None  # the operator's revocation file, read again when it changes
    # What every datagram is sealed with (`manifest.swarmkey`); None: keyed by the swarm id alone (a transport run
    # without a manifest, as tests do; it hides nothing from whoever knows the id).
    swarm_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.swarm_key is not None and len(self.swarm_key) != swarmkey.KEY_BYTES:
            raise NetworkError(f"a swarm key has {swarmkey.KEY_BYTES} bytes, not {len(self.swarm_key)}")

    def sealing_key(self) -> bytes:
        """The key every datagram of the swarm is sealed with (`transport.ipv8.seal`)."""
        return self.swarm_key or swarmkey.for_swarm_id(self.swarm_id)


class Admission:
    def __init__(self, settings: AdmissionSettings, node_id: str = "-") -> None:
        self.settings = settings
        self.node_id = node_id
        self.current: docs.Signed | None = None
        self._revoked: frozenset[str] = frozenset()
        self._parsed: OrderedDict[bytes, docs.Signed | str] = OrderedDict()  # certificate digest -> parsed, or why not
        self._watch_stamp: tuple[int, int] | None = None
        if settings.revocations is not None:
            self._install(settings.revocations)

    @property
    def certificate(self) -> bytes:
        return self.settings.certificate

    @property
    def version(self) -> int:
        return self.current.document.version if self.current is not None else 0

    def revoked(self, key_bin: bytes) -> bool:
        return bool(self._revoked) and docs.fingerprint(key_bin) in self._revoked

    def refusal(self, node_id: str, key_bin: bytes, certificate: bytes) -> str | None:
        """Why a hello from ``key_bin`` claiming ``node_id`` must be refused, or None to go on with it."""
        if not self.settings.certified:
            return "revoked" if self.revoked(key_bin) else None
        if not certificate:
            return "certificate_missing"
        parsed = self._parse(certificate)
        if isinstance(parsed, str):
            return parsed
        assert self.settings.creator_pubkey is not None  # a certified manifest is signed (trust refuses it otherwise)
        problem = docs.certificate_problem(parsed, swarm_id=self.settings.swarm_id, creator_pubkey=self.settings.creator_pubkey,
                                           node_key=key_bin.hex(), node_id=node_id, now=datetime.now(UTC),
                                           revoked=self._revoked)
        return f"certificate_{problem}" if problem is not None else None

    def _parse(self, certificate: bytes) -> docs.Signed | str:
        if len(certificate) > MAX_CERTIFICATE_BYTES:
            return "certificate_malformed"
        digest = hashlib.sha256(certificate).digest()
        found = self._parsed.get(digest)
        if found is None:
            try:
                found = docs.parse(certificate, docs.Certificate, "certificate")
            except QuinkglError:
                found = "certificate_malformed"
            self._parsed[digest] = found
            while len(self._parsed) > _PARSED_CACHE:
                self._parsed.popitem(last=False)
        return found

    # -- revocation lists ----------------------------------------------------------------------------------------
    def revocation_text(self) -> bytes:
        return self.current.text() if self.current is not None else b""

    def consider(self, data: bytes, source: str) -> str:
        """A revocation list heard from ``source``: ``adopted`` (newer, valid, now in force), ``known`` (not newer)
        or the reason it was refused."""
        try:
            signed = docs.parse(data, docs.RevocationList, f"revocation list from {source}")
        except QuinkglError:
            return "malformed"
        problem = docs.revocations_problem(signed, swarm_id=self.settings.swarm_id, creator_pubkey=self.settings.creator_pubkey)
        if problem is not None:
            return problem
        if signed.document.version <= self.version:
            return "known"
        self._install(signed)
        self._save()
        emit(log, logging.INFO, "revocations-adopted", context={"node": self.node_id}, version=self.version,
             revoked=len(self._revoked), source=source)
        return "adopted"

    def poll(self) -> bool:
        """Read the operator's file again if it changed; True when that put a newer list in force."""
        path = self.settings.watch
        if path is None:
            return False
        try:
            info = os.stat(path)
        except OSError:
            return False  # moved away for an edit: the list in force stays
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._watch_stamp:
            return False
        self._watch_stamp = stamp
        try:
            data = path.read_bytes()[: docs.MAX_DOCUMENT_BYTES + 1]
        except OSError:
            return False
        verdict = self.consider(data, str(path))
        if verdict not in ("adopted", "known"):
            emit(log, logging.WARNING, "revocations-refused", context={"node": self.node_id}, source=str(path),
                 reason=verdict)
        return verdict == "adopted"

    def _install(self, signed: docs.Signed) -> None:
        self.current = signed
        self._revoked = frozenset(signed.document.revoked)

    def _save(self) -> None:
        if self.settings.store is None or self.current is None:
            return
        try:
            atomic_write_bytes(self.settings.store, self.current.text() + b"\n", mode=0o600, overwrite=True)
        except (OSError, QuinkglError) as exc:  # the list is in force either way; a restart would lose it
            emit(log, logging.WARNING, "revocations-not-saved", context={"node": self.node_id}, path=str(self.settings.store),
                 error=str(exc)[:200])
