"""`quinkgl init DIR`: scaffold a new swarm (peer script, signed manifest, run config; see `quinkgl_cli.ops.scaffold`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create the files in (new or empty).", metavar="DIR")],
    name: Annotated[
        str | None, typer.Option("--name", help="Swarm name (default: the directory's name).", metavar="NAME")
    ] = None,
    sign_with: Annotated[
        Path | None, typer.Option("--sign-with", help="Sign with this creator key instead of a new creator.key.", metavar="KEY")
    ] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option("--passphrase-file", help="Passphrase of --sign-with's key (first line).", metavar="FILE")
    ] = None,
) -> None:
    """Create peer.py, swarm.qgl and peer.toml for a new swarm: `quinkgl run --config DIR/peer.toml` starts a peer."""
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.node.script import load_script
    from quinkgl_cli.ops import scaffold

    swarm = name if name is not None else directory.resolve().name
    key = keys.load_private_key(sign_with, keys.read_passphrase(passphrase_file)) if sign_with else keys.generate()
    arch_hash = compute_arch_hash(load_script(scaffold.TEMPLATE_SCRIPT).build_model(None))
    made = scaffold.create(directory, swarm, arch_hash, key, write_key=sign_with is None)
    for path in made.files:
        typer.echo(f"wrote {path}")
    typer.echo(f"creator key {made.public_key}")
    if made.key_written:
        typer.echo(f"keep {directory / scaffold.KEY} private: devices need only the other three files")
    typer.echo(f"start a peer: quinkgl run --config {directory / scaffold.CONFIG} --node-id peer-1")
    # The config pins one port: a second daemon on the same host would fail to bind it.
    typer.echo(f"a second peer on this host: quinkgl run --config {directory / scaffold.CONFIG} --node-id peer-2 --port 7002")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
