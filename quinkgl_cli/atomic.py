"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
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

    The temp file is created with ``mode`` from its first byte, so a secret is never readable by others,
    not even for a moment. With ``overwrite=False`` an existing ``path`` is left alone and an error raised
    (the final link step is atomic, so two writers cannot both win).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as exc:
        raise IOFailure(f"cannot write {path}: {exc.strerror}", "check that the directory exists and is writable") from exc
    try:
        os.fchmod(fd, mode)  # O_CREAT applies the umask; the mode asked for is the mode we want.
        with os.fdopen(fd, "wb") as fh:
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
