"""Stop signals while a command runs outside the daemon's round loop (which takes them over, `node.daemon`).

SIGTERM (systemctl stop, docker stop, kill) and SIGHUP (a closed terminal, a dropped ssh session) end the command
as Ctrl-C does, exit 130, with one line naming the signal (`cli.app`), not by the signal's default death (143 or 129 in a shell, -15 or
-1 to a supervisor), codes the exit-code table does not list.
"""

from __future__ import annotations

import signal

import typer

from quinkgl_cli.node.process import stop_signals

_received: list[str] = []  # the stop signal that interrupted this process's command, once one did


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def interrupted_by() -> str | None:
    """The signal that ended the command through `stop_as_interrupt`'s handler (None: Ctrl-C, or none)."""
    return _received[-1] if _received else None


def stop_as_interrupt(ctx: typer.Context) -> None:
    """Until the command returns: its previous handlers come back then (a process that called main() keeps its own)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in stop_signals() if sig != signal.SIGINT}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    ctx.call_on_close(restore)
