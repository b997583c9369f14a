"""`quinkgl info`: versions and the strategies this build knows. Reads package metadata; imports no torch or ipv8.

Its imports happen when it runs: `quinkgl --help` loads this module, and importlib.metadata alone would add
about 40 ms to that start-up.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

_DEPENDENCIES = ("torch", "pyipv8", "pydantic", "typer", "cryptography", "safetensors", "numpy", "scikit-learn")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Show the quinkgl version, known aggregation strategies and topologies, and Python/torch/IPv8 versions."""
    import json
    import platform
    import sys

    from quinkgl_cli import GUIDE_VERSION
    from quinkgl_cli.strategies import registry

    __version__ = _version("quinkgl-cli") or "unknown"

    deps = {d: _version(d) for d in _DEPENDENCIES}
    data: dict[str, Any] = {
        "quinkgl": __version__,
        "guide": GUIDE_VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "executable": sys.executable,
        "dependencies": deps,
        "aggregation": {name: registry.resolve("aggregation", name).summary for name in registry.names("aggregation")},
        "topology": {name: registry.resolve("topology", name).summary for name in registry.names("topology")},
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"quinkgl {__version__} (implements the QuinkGL guide {GUIDE_VERSION})")
    typer.echo(f"Python {data['python']} ({data['platform']})")
    typer.echo(f"torch {deps['torch'] or 'not installed'}, IPv8 (pyipv8) {deps['pyipv8'] or 'not installed'}")
    typer.echo("other: " + ", ".join(f"{d} {v or 'missing'}" for d, v in deps.items() if d not in ("torch", "pyipv8")))
    for kind in ("aggregation", "topology"):
        typer.echo(f"{kind} strategies:")
        entries: dict[str, str] = data[kind]
        width = max(len(n) for n in entries)
        for name, summary in entries.items():
            typer.echo(f"  {name:<{width}}  {summary}")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
