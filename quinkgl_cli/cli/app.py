"""The `quinkgl` console script: assembles the commands and maps every failure to a documented exit code."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from quinkgl_cli.errors import ExitCode, QuinkglError

# quinkgl uses no pydantic plugins; looking for them scans every installed package's entry points, tens of
# milliseconds of `manifest verify`'s start-up. Typer already disables them for its own adapters. An explicit
# setting wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _new_app() -> typer.Typer:
    app = typer.Typer(
        name="quinkgl",
        help="Peer daemon for decentralized (gossip) federated learning.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        # Plain help and usage errors: rendering them with rich costs about a third of `quinkgl --help`'s
        # start-up, and one-line "Error: ..." messages suit scripts better than boxed panels.
        rich_markup_mode=None,
    )
    app.callback()(_root)
    return app


def _root() -> None:
    """Peer daemon for decentralized (gossip) federated learning."""


# Each module registers its own commands (module name = command name); a command's heavy imports happen
# inside it, when it runs.
_COMMAND_MODULES = ("keygen", "manifest", "run", "simulate", "demo", "info")


def build_app(commands: tuple[str, ...] = _COMMAND_MODULES) -> typer.Typer:
    app = _new_app()
    for name in commands:
        importlib.import_module(f"quinkgl_cli.cli.{name}").register(app)
    return app


def _full_app() -> typer.Typer:
    app = globals().get("app")
    if app is None:
        app = globals()["app"] = build_app()
    return app


def __getattr__(name: str) -> typer.Typer:
    # `app` (every command) is built on first use: `main` builds only the command it runs, which saves
    # importing the other command modules and building their option parsers at each start.
    if name == "app":
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Typer exits 2 on a bad flag; in this project 2 means I/O, so flag errors are remapped to 1 (usage).
_TYPER_USAGE_EXIT = 2


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        target = build_app((args[0],)) if args and args[0] in _COMMAND_MODULES else _full_app()
        target(args=args, prog_name="quinkgl")
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
