"""The daemon's end of `quinkgl status`: a Unix socket that answers each connection with the latest snapshot.

Protocol: the client connects; the server writes the snapshot as one JSON line and closes. Before the daemon's
first snapshot (it is still starting: trusting the manifest, building the model) the line is
``{"state": "starting", "pid": N, "node_id": ID}`` (`STARTING`). Only this user (and
root) can connect: the socket is mode 0600 in a 0700 directory (`registry`), and the peer's credentials
(SO_PEERCRED) are checked as well, so a socket reached through some other path still answers nobody else.
The server runs in its own thread; the daemon only swaps in new snapshots.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path

from quinkgl_cli.errors import IOFailure
from quinkgl_cli.events import emit
from quinkgl_cli.ops import registry
from quinkgl_cli.ops.snapshot import DaemonSnapshot

log = logging.getLogger("quinkgl.ops.status")
_UCRED = struct.Struct("3i")  # pid, uid, gid
SEND_TIMEOUT_S = 2.0
STARTING = "starting"


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    owner: StatusServer


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        uid = peer_uid(conn)
        if uid not in (os.geteuid(), 0):
            emit(log, logging.WARNING, "status-refused", uid=uid, reason="another user")
            return
        conn.settimeout(SEND_TIMEOUT_S)
        try:
            conn.sendall(self.server.owner.encoded())  # type: ignore[attr-defined]
        except OSError:
            return  # the client went away or stalled: its loss, not the daemon's


class StatusServer:
    """Listens on ``<runtime dir>/<pid>.sock`` from `start` until `close`."""

    def __init__(self, directory: Path, node_id: str | None = None) -> None:
        self.directory = directory
        self.path = registry.socket_path(directory)
        self._lock = threading.Lock()
        # The node id, so that `quinkgl status` tells apart daemons that are all still starting.
        starting: dict[str, object] = {"state": STARTING, "pid": os.getpid()}
        if node_id is not None:
            starting["node_id"] = node_id
        self._payload = (json.dumps(starting) + "\n").encode()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        registry.private_dir(self.directory)
        for stale in registry.remove_stale(self.directory):
            emit(log, logging.DEBUG, "status-stale-removed", path=stale)
        self.path.unlink(missing_ok=True)  # our own pid's: a previous process with this pid is gone
        old_umask = os.umask(0o177)  # the socket is born 0600, never briefly wider
        try:
            server = _Server(os.fspath(self.path), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise IOFailure(f"cannot create the status socket {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="quinkgl-status", daemon=True)
        self._thread.start()
        emit(log, logging.DEBUG, "status-listening", path=self.path)

    def update(self, snapshot: DaemonSnapshot) -> None:
        payload = (json.dumps(snapshot.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            self._payload = payload

    def encoded(self) -> bytes:
        with self._lock:
            return self._payload

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.path.unlink(missing_ok=True)
