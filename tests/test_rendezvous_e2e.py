"""The guide's two-peer walkthrough: two `quinkgl run` of one swarm on one host, the second without
--bootstrap-peer, form a swarm through the state directory's rendezvous files (no flags, no network discovery)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls

pytestmark = pytest.mark.e2e

ROUNDS = 6
INTERVAL = 0.5


def _pair(tmp_path: Path, manifest: Path, home: Path, extra: list[str]) -> list[str]:
    env = ls.child_env(home)
    procs = []
    for i, name in enumerate(("peer-1", "peer-2")):
        args = {"shard": str(i), "num_shards": "2", "partition": "shards:2"}
        cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ls.free_port(), ROUNDS, INTERVAL, [],
                             tmp_path / f"ck-{name}", args, ["--min-peers", "1", "--min-peers-timeout", "20", *extra])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _peers_met(out: str) -> int:
    m = re.search(r" finished .*\bpeers_met=(\d+)", out)
    assert m, out[-2000:]
    return int(m.group(1))


def test_two_daemons_on_one_host_find_each_other_without_flags(tmp_path: Path) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    home = tmp_path / "home"
    outs = _pair(tmp_path, manifest, home, [])
    for out, other in zip(outs, ("peer-2", "peer-1"), strict=True):
        assert "rendezvous-announced" in out
        assert re.search(rf"peer-discovered peer={other} ", out), out[-2000:]
        assert "aggregated models" in out and _peers_met(out) == 1
    # Each withdrew its entry when it stopped: the directory does not fill with the dead.
    assert list((home / "rendezvous").glob("*/*.json")) == []


def test_no_rendezvous_keeps_a_daemon_to_its_seeds(tmp_path: Path) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    outs = _pair(tmp_path, manifest, tmp_path / "home", ["--no-rendezvous", "--min-peers", "0"])
    for out in outs:
        assert "rendezvous-announced" not in out and _peers_met(out) == 0
