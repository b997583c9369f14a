"""`quinkgl demo`: its flags, its workspace, its start-up when a port is taken, and one whole small run."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from quinkgl_cli.cli.app import main
from quinkgl_cli.cli.demo import workspace
from quinkgl_cli.node import localswarm as ls


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def test_a_bad_partition_is_a_usage_error_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("demo", "--partition", "foo", "--workdir", str(tmp_path / "w")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --partition: unknown partition 'foo'") and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_default_workspace_is_visible_and_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = workspace(None)
    second = workspace(None)
    assert (first, second) == (tmp_path / "quinkgl-demo", tmp_path / "quinkgl-demo-2") and second.is_dir()
    assert workspace(tmp_path / "given") == tmp_path / "given"


def test_final_model_path_is_read_from_the_finished_line(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.write_text('x INFO p round=2 finished rounds=2 val_accuracy=0.5 final_model="/a b/final_model.safetensors"\n')
    assert ls.PeerProcess("p", 0, log, None, {}).final_model_path() == Path("/a b/final_model.safetensors")  # type: ignore[arg-type]
    log.write_text("x INFO p round=2 finished rounds=2 val_accuracy=0.5 final_model=/c/final_model.safetensors\n")
    assert ls.PeerProcess("p", 0, log, None, {}).final_model_path() == Path("/c/final_model.safetensors")  # type: ignore[arg-type]


@pytest.mark.e2e
def test_a_peer_whose_port_was_taken_is_started_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    # Another process takes peer-1's port between the pick and the bind: here, this test holds it.
    thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    thief.bind(("127.0.0.1", 0))
    stolen = thief.getsockname()[1]
    real = ls.free_port
    picks = iter([stolen])
    monkeypatch.setattr(ls, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
    peers = ls.start_swarm(tmp_path, manifest, 2, 1, 0.3, "shards:5")
    relaunched: list[tuple[str, int]] = []
    try:
        ls.ensure_started(peers, timeout=120, on_relaunch=lambda p, old: relaunched.append((p.name, old)))
        assert relaunched == [("peer-1", stolen)] and peers[0].port != stolen
        assert all(p.started() for p in peers)
        assert ls.wait_all(peers, timeout=120) == [0, 0]
    finally:
        ls.stop_all(peers)
        thief.close()
    assert "peers_met=1" in peers[0].text() and "peers_met=1" in peers[1].text()


@pytest.mark.e2e
def test_small_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    assert run_cli("demo", "--peers", "2", "--rounds", "2", "--gossip-interval", "0.5") == 0
    out = capsys.readouterr().out
    root = tmp_path / "quinkgl-demo"
    assert f"workspace {root}" in out and "gain (points)" in out
    rows = [line for line in out.splitlines() if re.match(r"^\W*peer-\d\W", line) and "%" in line]
    assert len(rows) == 2
    for row in rows:
        assert re.search(r"[+-]\d+\.\d\s*\W*$", row), row  # the gain is in points: no % sign
    paths = re.findall(r"final model of peer-\d: (\S+)", out)
    assert len(paths) == 2 and all(Path(p).is_file() and Path(p).is_relative_to(root) for p in paths)
    logs = [(root / "logs" / f"peer-{i}.log").read_text() for i in (1, 2)]
    # A clean end: the peers leave without one of them failing to fetch from another that already left.
    # A datagram from another swarm on loopback (a daemon of an earlier test walking to a reused port) is refused
    # and logged by design; it is not the demo's doing, so only the demo's own warnings count.
    assert not [line for text in logs for line in text.splitlines()
                if ("WARNING" in line or "ERROR" in line) and "reason=other_swarm" not in line]


def test_local_swarm_children_get_an_absolute_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's peers run in their own working directories, where a relative entry would name another directory."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", str(tmp_path / "abs")]))
    env = ls.child_env(tmp_path / "home")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "src"), str(tmp_path / "abs")]
    assert env["QUINKGL_HOME"] == str(tmp_path / "home")


def test_free_port_stays_below_the_ephemeral_range() -> None:
    """Ports the kernel hands to outgoing connections must not be picked: one taken between the probe and the
    daemon's bind made a daemon exit 6 in CI."""
    low = ls._ephemeral_low()
    ports = {ls.free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports
    assert len(ports) > 1
