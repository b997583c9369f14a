"""`quinkgl revoke`: the swarm's creator signs a revocation list; daemons given it spread it to the swarm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quinkgl_cli.cli.admit import _PASSPHRASE_HELP, creator_and_manifest, node_key_text
from quinkgl_cli.errors import UsageError


def revoke(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="The swarm's manifest (.qgl).", metavar="FILE")],
    sign_with: Annotated[Path, typer.Option("--sign-with", help="The manifest's creator key (PEM).", metavar="KEY")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Revocation list to write (JSON).", metavar="FILE")],
    node_key: Annotated[
        list[str] | None, typer.Option("--node-key", metavar="KEY", help="A node key to revoke: hex or a file holding it (repeatable).")
    ] = None,
    certificate: Annotated[
        list[Path] | None, typer.Option("--certificate", metavar="FILE", help="Revoke the key this certificate admits (repeatable).")
    ] = None,
    previous: Annotated[
        Path | None, typer.Option("--previous", metavar="FILE", help="The list in force: its keys stay revoked, the version goes up by one.")
    ] = None,
    version: Annotated[int | None, typer.Option("--version", metavar="N", help="Version of the new list (default: previous + 1, else 1).")] = None,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", help=_PASSPHRASE_HELP, metavar="FILE")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
) -> None:
    """Sign a revocation list: peers drop the listed keys within seconds of hearing it, and refuse them after."""
    from datetime import UTC, datetime

    from quinkgl_cli.atomic import atomic_write_bytes
    from quinkgl_cli.manifest import admission as docs
    from quinkgl_cli.node.admission import read_document

    loaded, key = creator_and_manifest(manifest, sign_with, passphrase_file)
    revoked: list[str] = []
    last = 0
    if previous is not None:
        old = docs.parse(read_document(previous, "revocation list"), docs.RevocationList, f"revocation list {previous}")
        problem = docs.revocations_problem(old, swarm_id=loaded.swarm_id, creator_pubkey=loaded.manifest.creator_pubkey)
        if problem is not None:
            raise docs.problem_error(problem, f"--previous {previous}")
        revoked.extend(old.document.revoked)
        last = old.document.version
    for text in node_key or []:
        revoked.append(docs.fingerprint(node_key_text(text)))
    for path in certificate or []:
        cert, _key = docs.parse_certificate_file(read_document(path, "certificate"), f"certificate {path}")
        revoked.append(docs.fingerprint(cert.document.node_key))
    revoked = list(dict.fromkeys(revoked))
    if not node_key and not certificate:
        raise UsageError("nothing to revoke", "give --node-key KEY or --certificate FILE (and --previous FILE to keep a list)")
    if len(revoked) > docs.MAX_REVOKED:
        raise UsageError(f"{len(revoked)} keys exceed the {docs.MAX_REVOKED} a list can hold", "start a new swarm (a new manifest)")
    number = version if version is not None else last + 1
    if number <= last:
        raise UsageError(f"--version {number} is not above the previous list's {last}", "peers keep the higher version")
    doc = docs.RevocationList(swarm_id=loaded.swarm_id, version=number, issued_at=datetime.now(UTC).replace(microsecond=0),
                              revoked=tuple(revoked))
    signed = docs.sign(doc, key)
    atomic_write_bytes(output, signed.text() + b"\n", mode=0o644, overwrite=force)
    typer.echo(f"Revocation list version {number} ({len(revoked)} keys) written to {output}")
    typer.echo("Give it to a running daemon of the swarm (`quinkgl run --revocations FILE`; it reads the file again when it"
               " changes): peers pass it on within seconds.")


def register(app: typer.Typer) -> None:
    app.command("revoke")(revoke)
