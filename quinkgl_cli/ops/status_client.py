"""`quinkgl status`'s end of the status socket: ask every registered daemon for its snapshot."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from quinkgl_cli.errors import UsageError
from quinkgl_cli.ops import registry
from quinkgl_cli.ops.snapshot import DaemonSnapshot, from_json
from quinkgl_cli.ops.status_server import STARTING

READ_TIMEOUT_S = 2.0
MAX_REPLY_BYTES = 4 << 20  # a snapshot is a few kB; anything near this is not a quinkgl daemon


@dataclass(frozen=True)
class Reply:
    """One registered daemon: its snapshot, or why it gave none (``starting``: it has none yet)."""

    socket: Path
    snapshot: DaemonSnapshot | None
    error: str | None = None
    node_id: str | None = None  # a starting daemon's, before its first snapshot

    def to_json(self) -> dict[str, object]:
        if self.snapshot is not None:
            return self.snapshot.to_json()
        found: dict[str, object] = {"socket": str(self.socket), "error": self.error}
        if self.node_id is not None:
            found["node_id"] = self.node_id
        return found


def ask(path: Path, timeout: float = READ_TIMEOUT_S) -> Reply | None:
    """What the daemon behind ``path`` says; None when nobody listens there (a dead daemon's socket)."""
    chunks: list[bytes] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        while chunk := conn.recv(65536):
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise UsageError(f"{path} sent more than {MAX_REPLY_BYTES} bytes")
            chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} did not answer with JSON") from exc
    if isinstance(data, dict) and data.get("state") == STARTING and set(data) <= {"state", "pid", "node_id"}:
        node_id = data.get("node_id")
        return Reply(path, None, STARTING, node_id if isinstance(node_id, str) else None)
    return Reply(path, from_json(data))


def query(directory: Path, timeout: float = READ_TIMEOUT_S) -> list[Reply]:
    """Every live daemon registered in ``directory``, in start order; dead daemons' sockets are left out."""
    replies = []
    for path in registry.sockets(directory):
        try:
            reply = ask(path, timeout)
        except (OSError, UsageError) as exc:
            reason = exc.one_line() if isinstance(exc, UsageError) else (exc.strerror or type(exc).__name__)
            reply = Reply(path, None, reason)
        if reply is not None:
            replies.append(reply)
    return replies
