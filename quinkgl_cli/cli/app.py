"""The `quinkgl` console script: assembles the commands and maps every failure to a documented exit code."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from quinkgl_cli.errors import ExitCode, QuinkglError

# quinkgl uses no pydantic plugins; looking for them scans every installed package's entry points, a fifth of
# `manifest verify`'s start-up. Typer already disables them for its own adapters. An explicit setting wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

app = typer.Typer(
    name="quinkgl",
    help="Peer daemon for decentralized (gossip) federated learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help and usage errors: rendering them with rich costs ~40% of `quinkgl --help`'s start-up, and
    # one-line "Error: ..." messages suit scripts better than boxed panels (benchmarks/bench_cli.py).
    rich_markup_mode=None,
)



@app.callback()
def _root() -> None:
    """Peer daemon for decentralized (gossip) federated learning."""


# Each module registers its own commands; a command's heavy imports happen inside it, when it runs.
_COMMAND_MODULES = ("keygen", "manifest", "run", "simulate", "demo", "info")
for _name in _COMMAND_MODULES:
    importlib.import_module(f"quinkgl_cli.cli.{_name}").register(app)

# Typer exits 2 on a bad flag; in this project 2 means I/O, so flag errors are remapped to 1 (usage).
_TYPER_USAGE_EXIT = 2


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="quinkgl")
    except QuinkglError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        sys.stderr.flush()
        raise SystemExit(int(exc.code)) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None
    except SystemExit as exc:
        if exc.code == _TYPER_USAGE_EXIT:
            raise SystemExit(int(ExitCode.USAGE)) from None
        raise
