"""Same-host discovery files: what counts as an entry and what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quinkgl_cli.transport.rendezvous import Rendezvous

SWARM = "ab" * 32


def _pair(tmp_path: Path) -> tuple[Rendezvous, Rendezvous]:
    return Rendezvous(tmp_path, SWARM, "peer-1"), Rendezvous(tmp_path, SWARM, "peer-2")


def test_two_daemons_see_each_other_but_not_themselves(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    path = a.announce("0.0.0.0", 7001)
    b.announce("127.0.0.2", 7002)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(a.directory.stat().st_mode & 0o777) == "0o700"
    assert [(e.node_id, e.host, e.port) for e in a.peers()] == [("peer-2", "127.0.0.2", 7002)]
    assert [(e.node_id, e.host, e.port) for e in b.peers()] == [("peer-1", "127.0.0.1", 7001)]
    b.withdraw()
    assert a.peers() == []


def test_other_swarms_are_invisible(tmp_path: Path) -> None:
    Rendezvous(tmp_path, "cd" * 32, "peer-9").announce("127.0.0.1", 7009)
    a, _ = _pair(tmp_path)
    a.announce("127.0.0.1", 7001)
    assert a.peers() == []


def test_dead_daemons_are_dropped_and_their_files_removed(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    b.announce("127.0.0.1", 7002)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    entry = b.directory / "peer-2.json"
    data = json.loads(entry.read_text())
    data["pid"] = dead_pid
    entry.write_text(json.dumps(data))
    assert a.peers() == []
    assert not entry.exists()


def test_forged_or_unsafe_entries_are_ignored_with_a_reason(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    a.announce("127.0.0.1", 7001)
    d = a.directory
    (d / "peer-3.json").write_text("{not json")
    os.chmod(d / "peer-3.json", 0o600)
    (d / "peer-4.json").write_text(json.dumps({"node_id": "peer-5", "host": "127.0.0.1", "port": 1, "pid": os.getpid()}))
    os.chmod(d / "peer-4.json", 0o600)
    (d / "peer-6.json").write_text(json.dumps({"node_id": "peer-6", "host": "127.0.0.1", "port": 6, "pid": os.getpid()}))
    os.chmod(d / "peer-6.json", 0o644)  # readable by others: someone else could have prepared it
    os.mkfifo(d / "peer-7.json", 0o600)  # must not hang the reader
    os.symlink(d / "peer-1.json", d / "peer-8.json")
    entries, ignored = b.scan()
    assert [e.node_id for e in entries] == ["peer-1"]
    assert {p.path.name: p.reason for p in ignored} == {
        "peer-3.json": "malformed",
        "peer-4.json": "name_mismatch",
        "peer-6.json": "not_a_private_file",
        "peer-7.json": "not_a_private_file",
        "peer-8.json": "unreadable",
    }


def test_a_shared_directory_is_not_trusted(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    a.announce("127.0.0.1", 7001)
    os.chmod(a.directory, 0o777)
    entries, ignored = b.scan()
    assert entries == [] and [i.reason for i in ignored] == ["directory_not_private"]
