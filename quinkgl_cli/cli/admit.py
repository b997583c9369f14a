"""`quinkgl admit`: the swarm's creator issues a certificate admitting one node to a certified swarm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from quinkgl_cli.errors import CryptoError, UsageError

_PASSPHRASE_HELP = "Read the creator key's passphrase from the first line of this file (else $QUINKGL_KEY_PASSPHRASE)."


def creator_and_manifest(manifest: Path, sign_with: Path, passphrase_file: Path | None) -> tuple[Any, Any]:
    """The loaded manifest and the creator key, once the key is shown to be the one that signed the manifest."""
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.manifest.signing import verify_signature

    loaded = load_manifest(manifest)
    if not verify_signature(loaded.canonical, loaded.manifest.creator_pubkey, loaded.manifest.signature, f"manifest {manifest}"):
        raise UsageError(f"manifest {manifest} is unsigned: it has no creator to admit nodes or revoke keys",
                         "recreate it with --sign-with creator.key")
    key = keys.load_private_key(sign_with, keys.read_passphrase(passphrase_file))
    if keys.public_key_text(key) != loaded.manifest.creator_pubkey:
        raise CryptoError(f"--sign-with {sign_with} is not the key that signed {manifest} ({loaded.manifest.creator_pubkey})",
                          "sign with the swarm creator's key")
    return loaded, key


def node_key_text(value: str) -> str:
    """A node key given as its hex (what `quinkgl node-key` prints) or as a file holding it."""
    from quinkgl_cli.manifest.admission import normalize_node_key

    text = value.strip()
    path = Path(text)
    if len(text) < 148 and path.is_file():
        try:
            words = path.read_bytes()[:4096].decode("utf-8", "replace").split()
        except OSError as exc:
            from quinkgl_cli.errors import IOFailure

            raise IOFailure(f"cannot read node key file {path}: {exc.strerror}") from exc
        text = words[0] if words else ""
    return normalize_node_key(text)


def admit(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="The certified swarm's manifest (.qgl).", metavar="FILE")],
    node_key: Annotated[
        str, typer.Option("--node-key", metavar="KEY", help="The node's key: the hex `quinkgl node-key` printed on it, or a file holding it.")
    ],
    node_id: Annotated[str, typer.Option("--node-id", metavar="NAME", help="The node id the node runs with (--node-id of its `run`).")],
    sign_with: Annotated[Path, typer.Option("--sign-with", help="The manifest's creator key (PEM).", metavar="KEY")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Certificate file to write (JSON).", metavar="FILE")],
    expires_at: Annotated[
        str | None, typer.Option("--expires-at", metavar="DATE", help="Expiry: a date (valid through that day, UTC) or an ISO 8601 time.")
    ] = None,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", help=_PASSPHRASE_HELP, metavar="FILE")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
) -> None:
    """Issue a certificate admitting one node (its key and node id) to a certified swarm."""
    from datetime import UTC, datetime

    from quinkgl_cli import validation
    from quinkgl_cli.atomic import atomic_write_bytes
    from quinkgl_cli.manifest import admission as docs
    from quinkgl_cli.manifest import swarmkey
    from quinkgl_cli.manifest.create import parse_expires

    nid = validation.node_id(node_id)
    key_hex = node_key_text(node_key)
    loaded, key = creator_and_manifest(manifest, sign_with, passphrase_file)
    if loaded.manifest.membership != "certified":
        raise UsageError(f"manifest {manifest} is an open swarm: it admits any node, certificates play no part",
                         "create the manifest with --membership certified")
    now = datetime.now(UTC).replace(microsecond=0)
    expiry = parse_expires(expires_at, now) if expires_at is not None else None
    cert = docs.Certificate(swarm_id=loaded.swarm_id, node_id=nid, node_key=key_hex, issued_at=now, expires_at=expiry)
    signed = docs.sign(cert, key)
    # 0600: the file holds the swarm key, which reads and writes the swarm's traffic
    atomic_write_bytes(output, docs.certificate_file(signed, swarmkey.certified(key, loaded.swarm_id)), mode=0o600,
                       overwrite=force)
    typer.echo(f"Certificate for node {nid} written to {output} (it holds the swarm's key: send it to that node only)")
    typer.echo(f"Swarm ID: {loaded.swarm_id}")
    typer.echo(f"Node key: {docs.fingerprint(key_hex)}")
    typer.echo(f"Expires: {expiry.isoformat().replace('+00:00', 'Z') if expiry else 'never (revoke with `quinkgl revoke`)'}")


def register(app: typer.Typer) -> None:
    app.command("admit")(admit)
