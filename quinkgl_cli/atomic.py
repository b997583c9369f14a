"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from quinkgl_cli.errors import IOFailure


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | memoryview, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename.

    The temp file beside ``path`` gets a random name and is created with O_EXCL | O_NOFOLLOW and mode 0600, so
    nothing planted at a guessable name (a symlink to another file) is followed or reused, and a secret is
    never readable by others, not even for a moment; ``mode`` is set before the first byte is written. Its name
    is ``.<name>.<random>.<pid>.tmp``: cleanup code (``CheckpointStore.prune``) reads the writer's pid from it to
    remove what a killed writer left. With ``overwrite=False`` an existing ``path`` is left alone and an error
    raised (the final link step is atomic, so two writers cannot both win).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=directory)
    except OSError as exc:
        raise IOFailure(f"cannot write {path}: {exc.strerror}", "check that the directory exists and is writable") from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # mkstemp's 0600 widened (or kept) before any data is in the file
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise IOFailure(f"{path} already exists", "choose another path or pass --force") from exc
            finally:
                os.unlink(tmp)
        fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IOFailure(f"cannot write {path}: {exc.strerror}", "check free space and permissions") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode, overwrite=overwrite)
