"""Output files a daemon keeps open for its whole run (``--metrics-file``, ``--log-file``) and their paths.

A file removed while open (alone, or with its directory: ``rm -r`` of a run's output folder) takes every later line
into nothing without an error. Its writers check before each line that the path still names the open file; when it
does not they make it again, and while that cannot be done (the directory is gone) they say so once with
`lost_line`'s WARNING and try again at the next line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from quinkgl_cli.events import emit

log = logging.getLogger("quinkgl.outputs")


def names_open_file(path: Path | str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not once it was removed, or replaced by another)."""
    try:
        named = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def lost_line(flag: str, path: Path | str, error: str | None) -> None:
    emit(log, logging.WARNING, "output-lost", flag=flag, path=path, error=error,
         hint="the file was removed and cannot be made again (its directory is gone?): its lines are lost until it "
              "can; it is tried again at each line")


def reopened_line(flag: str, path: Path | str) -> None:
    emit(log, logging.WARNING, "output-reopened", flag=flag, path=path,
         hint="the file was removed while the daemon ran: made again, earlier lines are not in it")
