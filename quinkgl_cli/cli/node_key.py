"""`quinkgl node-key`: the public part of a node's transport key in one swarm, what the swarm's creator certifies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def node_key(
    node_id: Annotated[str, typer.Option("--node-id", metavar="NAME", help="The node id this node runs with (--node-id of `run`).")],
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", metavar="FILE", help="The swarm's manifest: a node has another key in each swarm.")
    ],
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="Node keys' home (default: $QUINKGL_HOME).", metavar="DIR")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the key to this file.", metavar="FILE")] = None,
) -> None:
    """Print this node's public transport key in a swarm (created on first use, as `run` would), to send to the
    swarm's creator."""
    from quinkgl_cli import validation
    from quinkgl_cli.atomic import atomic_write_text
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.node.startup import node_state_path
    from quinkgl_cli.transport.ipv8.identity import swarm_identity

    nid = validation.node_id(node_id)
    swarm_id = load_manifest(manifest).swarm_id
    text = swarm_identity(node_state_path(state_dir, nid), swarm_id).pub().key_to_bin().hex()
    if output is not None:
        atomic_write_text(output, text + "\n", mode=0o644, overwrite=True)
    typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command("node-key")(node_key)
