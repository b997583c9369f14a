"""Exclusive use of a node's directories (checkpoints, IPv8 identity) by one running daemon.

Two daemons writing checkpoints into one directory would resume from each other's rounds, and two sharing one
IPv8 key would be one peer to the swarm. The lock is an OS file lock (filelock): it goes with the process, so a
daemon killed with ``kill -9`` never leaves a stale lock behind. A daemon whose start-up fails after taking a
directory it created gives it back (`HeldDirectory.abandon`): a failed start leaves no empty directory behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import IOFailure, NodeConfigError

LOCK_NAME = ".quinkgl-daemon.lock"


@dataclass
class HeldDirectory:
    path: Path
    lock: Any  # filelock.FileLock, held
    created: bool  # this process made the directory
    made_parents: tuple[Path, ...] = ()  # the parents it made on the way, nearest first

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """Release the lock; remove the directory when this process created it and left nothing in it, and then
        each parent it created on the way that is left empty (``checkpoints/<swarm>`` of a failed first start)."""
        self.release()
        if not self.created:
            return
        lock_file = self.path / LOCK_NAME
        if {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
            lock_file.unlink(missing_ok=True)
            self.path.rmdir()
            for parent in self.made_parents:
                if any(parent.iterdir()):
                    break  # another node's directory, made meanwhile
                parent.rmdir()


def lock_directory(directory: Path, what: str, hint: str) -> HeldDirectory:
    """Hold ``directory`` for this process until it exits; NodeConfigError when another process holds it."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IOFailure(f"{what} {directory} is not a directory", "remove or rename that file, or choose another path")
    created = not directory.exists()
    made_parents = tuple(p for p in directory.parents if not p.exists())
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IOFailure(f"cannot create {what} {directory}: {exc.strerror}",
                        "choose a directory this user can write to") from exc
    lock = FileLock(str(directory / LOCK_NAME), timeout=0, mode=0o600)
    try:
        lock.acquire()
    except Timeout as exc:
        raise NodeConfigError(f"{what} {directory} is in use by another running daemon", hint) from exc
    except OSError as exc:
        raise IOFailure(f"cannot lock {what} {directory}: {exc.strerror}", "choose a directory this user can write to") from exc
    return HeldDirectory(directory, lock, created, made_parents)
