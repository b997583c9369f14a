"""Where running daemons' status sockets live: one private directory per user, one socket per daemon process.

The directory is ``<state dir>/run`` when ``--state-dir`` or ``$QUINKGL_HOME`` names the state directory, else
``$XDG_RUNTIME_DIR/quinkgl`` (cleared at logout, on tmpfs), else ``~/.local/state/quinkgl/run``. It is created
mode 0700 and refused when another user owns it; a daemon's socket in it is ``<pid>.sock``, mode 0600. The
directory listing is the registry: a socket nobody answers on is what a killed daemon left, and the next daemon
to start removes it (`remove_stale`).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from quinkgl_cli.errors import IOFailure
from quinkgl_cli.paths import HOME_ENV, state_home

SUFFIX = ".sock"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
PROBE_TIMEOUT_S = 0.5


def runtime_dir(state_dir: Path | None = None) -> Path:
    if state_dir is not None or os.environ.get(HOME_ENV):
        return state_home(state_dir) / "run"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "quinkgl"
    return state_home() / "run"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter: created 0700, or an existing one of ours narrowed to 0700."""
    try:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            pass  # something that is not a directory: refused below
        info = path.lstat()
    except OSError as exc:
        raise IOFailure(f"cannot create the status directory {path}: {exc.strerror}",
                        "check the permissions of --state-dir / $XDG_RUNTIME_DIR") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise IOFailure(f"status directory {path} is not a directory (or is a symlink)", "remove it or use another --state-dir")
    if info.st_uid != os.geteuid():
        raise IOFailure(f"status directory {path} belongs to another user", "use your own --state-dir")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def socket_path(directory: Path, pid: int | None = None) -> Path:
    path = directory / f"{os.getpid() if pid is None else pid}{SUFFIX}"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise IOFailure(f"status socket path {path} is longer than {MAX_SOCKET_PATH} bytes",
                        "use a shorter --state-dir")
    return path


def sockets(directory: Path) -> list[Path]:
    """The registered sockets, oldest process id first; none when the directory does not exist."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise IOFailure(f"cannot list {directory}: {exc.strerror}") from exc
    found = [p for p in entries if p.name.endswith(SUFFIX) and p.name[: -len(SUFFIX)].isdigit()]
    return sorted(found, key=lambda p: int(p.name[: -len(SUFFIX)]))


def answers(path: Path) -> bool:
    """Whether a process listens on ``path`` (a refused or vanished socket is a dead daemon's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy or slow: alive
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Remove the sockets of daemons that are gone; returns what was removed."""
    removed = []
    for path in sockets(directory):
        if path.is_socket() and not answers(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
