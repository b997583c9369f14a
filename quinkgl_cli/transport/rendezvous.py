"""Same-host discovery without network traffic: a per-swarm directory of announcement files.

Owns the rendezvous directory of one swarm (``<state home>/rendezvous/<swarm id prefix>/``, 0700) and this
daemon's entry in it. A daemon announces the UDP address it listens on in ``<node id>.json`` (0600, written
atomically) and reads the others' entries as extra seeds, so two `quinkgl run` of one swarm on one machine find
each other with no flags. Only files owned by this user in a private directory count: another local user cannot
steer a daemon to an address. Entries whose process is gone are ignored (and removed, so the directory does not
fill with the dead). The files say where to knock; whether to trust who answers is still the swarm's signed
handshake, so a forged entry costs one wasted walk, never a model.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quinkgl_cli.atomic import atomic_write_text
from quinkgl_cli.events import emit

log = logging.getLogger("quinkgl.transport.rendezvous")

ENTRY_SUFFIX = ".json"
MAX_ENTRY_BYTES = 4096
# A swarm id is a hex digest; its first 32 characters name the directory (unique enough on one host, short paths).
_ID_CHARS = 32


class Entry(BaseModel):
    """One daemon's announcement, as read from disk: validated like any other input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str = Field(min_length=1, max_length=128)
    host: str = Field(min_length=1, max_length=64)
    port: int = Field(ge=1, le=65535)
    pid: int = Field(ge=1)


@dataclass(frozen=True)
class Ignored:
    """An entry that was not used, and why (logged once per file by the caller's choice)."""

    path: Path
    reason: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive, but not ours (its file would not be ours either)
        return True
    return True


class Rendezvous:
    """This daemon's view of its swarm's rendezvous directory."""

    def __init__(self, state_home: Path, swarm_id: str, node_id: str) -> None:
        self.directory = Path(state_home) / "rendezvous" / swarm_id[:_ID_CHARS]
        self.node_id = node_id
        self._own = self.directory / f"{node_id}{ENTRY_SUFFIX}"
        self._reported: set[tuple[str, str]] = set()

    def announce(self, host: str, port: int) -> Path:
        """Write (or replace) this daemon's entry. A wildcard listen address is announced as loopback."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        entry = Entry(node_id=self.node_id, host=host, port=port, pid=os.getpid())
        atomic_write_text(self._own, entry.model_dump_json() + "\n", mode=0o600)
        emit(log, logging.INFO, "rendezvous-announced", path=str(self._own), host=host, port=port)
        return self._own

    def withdraw(self) -> None:
        """Remove this daemon's entry (a clean stop); a missing entry is fine."""
        try:
            self._own.unlink()
        except FileNotFoundError:
            pass

    def peers(self) -> list[Entry]:
        """The live entries of the other daemons of this swarm on this host."""
        entries, ignored = self.scan()
        for item in ignored:
            key = (item.path.name, item.reason)
            if key not in self._reported:
                self._reported.add(key)
                emit(log, logging.WARNING, "rendezvous-entry-ignored", file=str(item.path), reason=item.reason)
        return entries

    def scan(self) -> tuple[list[Entry], list[Ignored]]:
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return [], []
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return [], [Ignored(self.directory, "directory_not_private")]
        entries: list[Entry] = []
        ignored: list[Ignored] = []
        for path in sorted(self.directory.glob(f"*{ENTRY_SUFFIX}")):
            if path == self._own:
                continue
            entry, reason = self._read(path)
            if entry is not None:
                entries.append(entry)
            elif reason is not None:
                ignored.append(Ignored(path, reason))
        return entries, ignored

    def _read(self, path: Path) -> tuple[Entry | None, str | None]:
        try:
            # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO planted under an entry's name must not redirect or hang us.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None, None  # withdrawn between listing and reading
        except OSError:
            return None, "unreadable"
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                return None, "not_a_private_file"
            raw = fh.read(MAX_ENTRY_BYTES + 1)
        if len(raw) > MAX_ENTRY_BYTES:
            return None, "too_large"
        try:
            entry = Entry.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None, "malformed"
        if path.name != f"{entry.node_id}{ENTRY_SUFFIX}":
            return None, "name_mismatch"
        if not _alive(entry.pid):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return None, None  # a daemon that died without withdrawing: nothing to report, it is simply gone
        return entry, None
