"""Exclusive use of a node's directories (checkpoints, IPv8 identity) by one running daemon.

Two daemons writing checkpoints into one directory would resume from each other's rounds, and two sharing one
IPv8 key would be one peer to the swarm. The lock is an OS file lock (filelock): it goes with the process, so a
daemon killed with ``kill -9`` never leaves a stale lock behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, NodeConfigError

LOCK_NAME = ".quinkgl-daemon.lock"


def lock_directory(directory: Path, what: str, hint: str) -> Any:
    """Hold ``directory`` for this process until it exits; NodeConfigError when another process holds it."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IOFailure(f"cannot create {what} {directory}: {exc.strerror}", hint) from exc
    lock = FileLock(str(directory / LOCK_NAME), timeout=0, mode=0o600)
    try:
        lock.acquire()
    except Timeout as exc:
        raise NodeConfigError(f"{what} {directory} is in use by another running daemon", hint) from exc
    except OSError as exc:
        raise IOFailure(f"cannot lock {what} {directory}: {exc.strerror}", hint) from exc
    return lock
