"""Stop signals while a command runs outside the daemon's round loop (which takes them over, `node.daemon`).

SIGTERM (systemctl stop, docker stop, kill) and SIGHUP (a closed terminal, a dropped ssh session) end the command
as Ctrl-C does: `interrupted`, exit 130 (`cli.app`), not by the signal's default death (143 or 129 in a shell, -15 or
-1 to a supervisor), codes the exit-code table does not list.
"""

from __future__ import annotations

import signal

import typer

from quinkgl_cli.node.process import stop_signals


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_as_interrupt(ctx: typer.Context) -> None:
    """Until the command returns: its previous handlers come back then (a process that called main() keeps its own)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in stop_signals() if sig != signal.SIGINT}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    ctx.call_on_close(restore)
