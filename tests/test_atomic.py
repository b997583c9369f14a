"""atomic_write_bytes: random O_EXCL | O_NOFOLLOW temp file, private from its first byte, renamed into place."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import IOFailure


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(path, flags, mode) of every file os.open creates."""
    seen: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            seen.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return seen


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_temp_file_is_exclusive_unfollowed_private_and_named_for_cleanup(
    tmp_path: Path, created: list[tuple[str, int, int]], mode: int
) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"data", mode=mode)
    assert target.read_bytes() == b"data" and stat.S_IMODE(target.stat().st_mode) == mode
    [(name, flags, create_mode)] = created
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and create_mode == 0o600
    temp = Path(name)
    assert temp.parent == tmp_path and temp.name.startswith(".out.bin.") and temp.name.endswith(f".{os.getpid()}.tmp")
    # The middle part is random: the name cannot be guessed in advance.
    assert temp.name.removeprefix(".out.bin.").removesuffix(f".{os.getpid()}.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_link_planted_at_the_old_predictable_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    trap = tmp_path / f".k.key.{os.getpid()}.tmp"
    trap.symlink_to(victim)
    atomic_write_bytes(tmp_path / "k.key", b"secret", mode=0o600)
    assert victim.read_bytes() == b"untouched" and trap.is_symlink()
    assert (tmp_path / "k.key").read_bytes() == b"secret"


def test_no_overwrite_leaves_the_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    target.write_bytes(b"old")
    with pytest.raises(IOFailure, match="already exists"):
        atomic_write_bytes(target, b"new", overwrite=False)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["k.key"]


def test_missing_directory_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(IOFailure, match="cannot write"):
        atomic_write_bytes(tmp_path / "nope" / "f", b"x")


def test_checkpoint_prune_removes_the_temp_file_of_a_writer_that_died(tmp_path: Path) -> None:
    import subprocess
    import sys

    from quinkgl_cli.node.checkpoint import CheckpointStore

    # The writer dies between fsync and rename, leaving its temp file (its pid in the name) behind.
    code = (
        "import os, sys; from pathlib import Path; from quinkgl_cli import atomic;"
        "os.replace = lambda *a: os._exit(0);"
        "atomic.atomic_write_bytes(Path(sys.argv[1]) / 'ckpt-00000001-r1.safetensors', b'x', mode=0o600)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    [left] = list(tmp_path.glob(".ckpt-*.tmp"))
    ours = tmp_path / f".ckpt-00000002-r1.safetensors.abcd1234.{os.getpid()}.tmp"  # a live writer's: kept
    ours.write_bytes(b"")
    CheckpointStore(tmp_path).prune()
    assert not left.exists() and ours.exists()
