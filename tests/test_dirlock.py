"""One daemon per checkpoint directory and node identity (node/dirlock.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.node.dirlock import lock_directory


def test_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "peer-1"
    held = lock_directory(target, "checkpoint directory", "hint")
    assert target.is_dir()
    other = subprocess.run(
        [sys.executable, "-c",
         "import sys; from quinkgl_cli.node.dirlock import lock_directory; from quinkgl_cli.errors import QuinkglError\n"
         "try:\n    lock_directory(sys.argv[1], 'checkpoint directory', 'hint')\n"
         "except QuinkglError as e:\n    print(e.one_line()); sys.exit(int(e.code))\n",
         str(target)], capture_output=True, text=True, timeout=60)
    assert other.returncode == ExitCode.NODE and "in use by another running daemon" in other.stdout
    with pytest.raises(NodeConfigError):
        lock_directory(target, "checkpoint directory", "hint")
    held.release()
    lock_directory(target, "checkpoint directory", "hint").release()


def test_an_abandoned_directory_takes_the_empty_parents_it_made_with_it(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    held = lock_directory(tmp_path / "home" / "checkpoints" / "swarm" / "peer-1", "checkpoint directory", "hint")
    held.abandon()
    assert list((tmp_path / "home").iterdir()) == []  # checkpoints/ and swarm/ were made by this start: gone
    kept = lock_directory(tmp_path / "home" / "checkpoints" / "swarm" / "peer-1", "checkpoint directory", "hint")
    other = lock_directory(tmp_path / "home" / "checkpoints" / "swarm" / "peer-2", "checkpoint directory", "hint")
    kept.abandon()
    assert [p.name for p in (tmp_path / "home" / "checkpoints" / "swarm").iterdir()] == ["peer-2"]
    other.release()

