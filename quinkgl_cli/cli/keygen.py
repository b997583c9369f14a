"""`quinkgl keygen`: create a creator key, or print the public key of an existing one."""

from pathlib import Path
from typing import Annotated

import typer

from quinkgl_cli.errors import UsageError

_PASSPHRASE_HELP = "Read the key's passphrase from the first line of this file (else $QUINKGL_KEY_PASSPHRASE; none: unencrypted)."


def keygen(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the new private key (PEM, mode 0600).", metavar="FILE")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file at --output.")] = False,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", help=_PASSPHRASE_HELP, metavar="FILE")] = None,
    show_public: Annotated[
        Path | None, typer.Option("--show-public", help="Print the public key of this existing key file and exit.", metavar="KEY")
    ] = None,
) -> None:
    """Create an Ed25519 creator key for signing manifests; prints its public key (ed25519:<hex>)."""
    from quinkgl_cli import keys

    if show_public is not None:
        if output is not None:
            raise UsageError("--show-public and --output cannot be combined", "create a key or show one, not both")
        key = keys.load_private_key(show_public, keys.read_passphrase(passphrase_file))
        typer.echo(keys.public_key_text(key))
        return
    if output is None:
        raise UsageError("keygen needs --output FILE", "e.g. quinkgl keygen --output creator.key")
    passphrase = keys.read_passphrase(passphrase_file)
    key = keys.generate()
    keys.save_private_key(output, key, passphrase, force=force)
    protected = " (passphrase-protected)" if passphrase else ""
    # The note on stderr, the key alone on stdout: `quinkgl keygen -o creator.key > creator.pub` gives the .pub
    # file that --trusted-pubkey takes (in a terminal both lines show, as the guide prints them).
    typer.echo(
        f"Private key written with 0600 permissions{protected}. Treat this file as a secret: "
        f"never commit {output} to git or share it.",
        err=True,
    )
    typer.echo(keys.public_key_text(key))


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)
