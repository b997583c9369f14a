"""A node's own admission, settled at start-up: its certificate (certified swarms) and the revocation list in force.

A node of a certified swarm refuses to start without a certificate that admits it: issued by the manifest's
creator for this swarm, this node id and this node's transport key, unexpired and not revoked (exit 4; a bad
signature 3, a missing file 2, a malformed one 1). The revocation list in force is the newest of the operator's
``--revocations`` file and the one this node adopted last time (kept in its state directory). While the daemon
runs, its certificate's expiry is checked before every round like the manifest's.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, TrustError
from quinkgl_cli.events import emit
from quinkgl_cli.manifest import admission as docs
from quinkgl_cli.manifest import swarmkey
from quinkgl_cli.manifest.trust import TrustedManifest
from quinkgl_cli.transport.admission import AdmissionSettings

log = logging.getLogger("quinkgl.daemon")


def store_path(state_dir: Path, swarm_id: str) -> Path:
    """Where a node keeps the newest revocation list it adopted for a swarm."""
    return Path(state_dir) / f"revocations-{swarm_id.removeprefix('sha256:')[:16]}.json"


def read_document(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(docs.MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError as exc:
        raise IOFailure(f"{what} {path} not found", "check the path") from exc
    except IsADirectoryError as exc:
        raise IOFailure(f"{what} {path} is a directory", "give the path of a file") from exc
    except OSError as exc:
        raise IOFailure(f"cannot read {what} {path}: {exc.strerror}", "check its permissions") from exc
    return data


def prepare_admission(trusted: TrustedManifest, node_id: str, state_dir: Path, certificate: Path | None,
                      revocations: Path | None, node_key: Any = None, create_key: bool = True) -> AdmissionSettings:
    """The transport's admission settings; raises QuinkglError when this node may not join. ``node_key``: this
    node's transport key in this swarm (derived from ``state_dir``'s key file when None and needed; that file is
    created when missing unless ``create_key`` is False, as for a dry run, which writes nothing). The swarm key comes from the
    certificate file in a certified swarm, from the manifest in an open one (`manifest.swarmkey`)."""
    manifest = trusted.manifest
    creator = manifest.creator_pubkey if trusted.signed else None
    newest = _newest_revocations(trusted, creator, state_dir, revocations)
    revoked = frozenset(newest.document.revoked) if newest is not None else frozenset()
    certified = manifest.membership == "certified"
    cert_text = b""
    swarm_key = swarmkey.open_swarm(trusted.canonical, manifest.signature if trusted.signed else None)
    if certified:
        if certificate is None:
            raise TrustError(
                f"swarm {manifest.name!r} admits only certified nodes and no --certificate was given",
                f"send the output of `quinkgl node-key --node-id {node_id} --manifest MANIFEST` to the swarm's creator, who runs `quinkgl admit`;"
                " then pass --certificate FILE",
            )
        assert creator is not None  # trust refuses an unsigned certified manifest
        signed, issued = docs.parse_certificate_file(read_document(certificate, "certificate"), f"certificate {certificate}")
        if node_key is None:
            from quinkgl_cli.transport.ipv8.identity import swarm_identity

            node_key = swarm_identity(state_dir, trusted.swarm_id, create=create_key)
        problem = docs.certificate_problem(signed, swarm_id=trusted.swarm_id, creator_pubkey=creator,
                                           node_key=node_key.pub().key_to_bin().hex(), node_id=node_id,
                                           now=_now(), revoked=revoked)
        if problem is not None:
            raise docs.problem_error(problem, f"certificate {certificate}")
        if issued is None:
            raise TrustError(f"certificate {certificate} holds no swarm key (it was made before swarms were encrypted)",
                             "ask the swarm's creator for a new one, made with `quinkgl admit`")
        swarm_key = issued
        cert_text = signed.text()
        emit(log, logging.INFO, "certificate-ok", node_id=node_id, expires=_iso(signed.document.expires_at))
    elif certificate is not None:
        emit(log, logging.WARNING, "certificate-ignored", reason="open swarm", certificate=certificate)
    return AdmissionSettings(trusted.swarm_id, creator, certified, cert_text, newest,
                             store=store_path(state_dir, trusted.swarm_id), watch=revocations, swarm_key=swarm_key)


def _newest_revocations(trusted: TrustedManifest, creator: str | None, state_dir: Path,
                        given: Path | None) -> docs.Signed | None:
    found: list[docs.Signed] = []
    stored = store_path(state_dir, trusted.swarm_id)
    for path, ours in ((stored, True), (given, False)):
        if path is None or (ours and not path.exists()):
            continue
        signed = docs.parse(read_document(path, "revocation list"), docs.RevocationList, f"revocation list {path}")
        problem = docs.revocations_problem(signed, swarm_id=trusted.swarm_id, creator_pubkey=creator)
        if problem is not None:
            if ours:
                raise IOFailure(f"stored revocation list {path} is not valid for this swarm ({docs.explain(problem)})",
                                "delete it; peers send the list in force again")
            raise docs.problem_error(problem, f"revocation list {path}")
        found.append(signed)
    return max(found, key=lambda s: s.document.version, default=None)


def check_certificate_expiry(settings: AdmissionSettings, now: datetime) -> None:
    """TrustError once this node's own certificate has expired (peers refuse it from then on)."""
    if not settings.certificate:
        return
    cert = docs.parse(settings.certificate, docs.Certificate, "certificate").document
    if cert.expires_at is not None and now > cert.expires_at:
        raise TrustError(f"this node's certificate expired at {_iso(cert.expires_at)}",
                         "ask the swarm's creator for a new one, made with `quinkgl admit`")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value is not None else "never"
