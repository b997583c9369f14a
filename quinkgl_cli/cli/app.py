"""The `quinkgl` console script: assembles the commands and maps every failure to a documented exit code."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, NoReturn

import typer

from quinkgl_cli import GUIDE_VERSION, __version__
from quinkgl_cli.cli.stopsignals import interrupted_by
from quinkgl_cli.errors import ExitCode, QuinkglError

try:  # recent typers bundle their own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typers depend on click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

# A bare `quinkgl` or `quinkgl manifest` raises this (click >= 8.2; older clicks print the help themselves).
_NoArgsIsHelp: type[click_errors.ClickException] | tuple[()] = getattr(click_errors, "NoArgsIsHelpError", ())

# quinkgl uses no pydantic plugins; looking for them scans every installed package's entry points, tens of
# milliseconds of `manifest verify`'s start-up. Typer already disables them for its own adapters. An explicit
# setting wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _new_app() -> typer.Typer:
    app = typer.Typer(
        name="quinkgl",
        help="Peer daemon for decentralized (gossip) federated learning.",
        no_args_is_help=True,
        # `quinkgl --install-completion` / `--show-completion`: bash, zsh, fish and PowerShell.
        add_completion=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
        # Plain help: rendering it with rich costs about a third of `quinkgl --help`'s start-up.
        rich_markup_mode=None,
    )
    app.callback()(_root)
    return app


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"quinkgl {__version__} (implements the QuinkGL guide {GUIDE_VERSION})")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Peer daemon for decentralized (gossip) federated learning."""


# Each module registers its own commands (module name = command name); a command's heavy imports happen
# inside it, when it runs.
_COMMAND_MODULES = ("keygen", "manifest", "run", "simulate", "demo", "info", "init", "status", "report", "admit", "revoke",
                    "node_key", "doctor")


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


def main(argv: list[str] | None = None) -> None:
    """Run the command line ``argv`` and leave with its exit code (SystemExit, also on success)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        module = args[0].replace("-", "_") if args else ""
        target = build_app((module,)) if module in _COMMAND_MODULES else _full_app()
        # Not standalone: click's own error report (usage line, "Try ...", blank line, "Error: ...") is
        # replaced by the one-line `error: ...` every other failure prints.
        result = typer.main.get_command(target).main(args=args, prog_name="quinkgl", standalone_mode=False)
    except QuinkglError as exc:
        _fail(exc.one_line(), exc.code)
    except click_errors.ClickException as exc:
        if isinstance(exc, _NoArgsIsHelp):
            exc.show()  # the help text, on stderr: a command was expected
            raise SystemExit(int(ExitCode.USAGE)) from None
        where = exc.ctx.command_path if isinstance(exc, click_errors.UsageError) and exc.ctx is not None else "quinkgl"
        _fail(f"{exc.format_message()} (see `{where} --help`)", ExitCode.USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None
    # Not standalone, click returns the code of a `typer.Exit` (e.g. 0 after --help) or the command's return value;
    # typer makes a KeyboardInterrupt inside the command 130 without a word, which a terminal's ^C explains but a
    # supervisor's SIGTERM does not.
    if result == ExitCode.INTERRUPTED and (name := interrupted_by()) is not None:
        sys.stderr.write(f"interrupted by {name}\n")
    raise SystemExit(result if isinstance(result, int) else int(ExitCode.OK))


def _fail(message: str, code: ExitCode) -> NoReturn:
    sys.stderr.write(f"error: {message.replace(chr(10), ' ')}\n")
    sys.stderr.flush()
    raise SystemExit(int(code)) from None
