"""`quinkgl doctor` as a user runs it, beside a real `quinkgl run` seed daemon on loopback: it finds the daemon
(through the rendezvous directory, or --bootstrap-peer localhost:PORT), probes it, reports both ports reachable and
the direct path, exits 0 and leaves the daemon running; with nobody to meet it exits 9 within its timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.node import localswarm as ls

pytestmark = pytest.mark.e2e


def _doctor(manifest: Path, env: dict[str, str], *extra: str, timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    cmd = [sys.executable, "-m", "quinkgl_cli", "doctor", "--manifest", str(manifest), "--node-id", "doc",
           "--trust-policy", "tofu", "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), done.stderr


def _wait_for(path: Path, word: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while word not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {word!r} within {timeout}s: {path.read_text()[-3000:]}"
        time.sleep(0.1)


def test_doctor_beside_a_seed_daemon_reports_both_ports_reachable(tmp_path: Path) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    env = ls.child_env(tmp_path / "home")
    port = ls.free_port()
    log = tmp_path / "seed.log"
    cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, "seed", port, 200, 5.0, [], tmp_path / "ck", {})
    with open(log, "wb") as out:
        seed = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(log, "transport-started", seed, 120)
        code, report, err = _doctor(manifest, env)  # no flags: the rendezvous file says where the seed is
        assert code == 0, (report, err[-2000:])
        assert report["verdict"] == "reachable" and report["udp_state"] == "open" and report["tcp_state"] == "open"
        assert report["nat"] == "none" and report["problems"] == []
        (peer,) = report["peers"]
        assert peer["node_id"] == "seed" and peer["address"] == f"127.0.0.1:{port}"
        assert (peer["receive"], peer["send"], peer["tcp_in"], peer["tcp_out"]) == ("direct", "direct", True, "open")
        assert any("loopback" in n for n in report["notes"])
        code, report, err = _doctor(manifest, env, "--no-rendezvous", "--bootstrap-peer", f"localhost:{port}")
        assert code == 0 and [p["node_id"] for p in report["peers"]] == ["seed"], (report, err[-2000:])
        assert seed.poll() is None  # the daemon noticed a peer come and go, nothing more
        _wait_for(log, "peer-lost peer=doc", seed, 30)
    finally:
        if seed.poll() is None:
            os.killpg(seed.pid, signal.SIGTERM)
        seed.wait(timeout=30)


def test_doctor_with_nobody_to_meet_exits_9_within_its_timeout(tmp_path: Path) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    env = ls.child_env(tmp_path / "home")
    started = time.monotonic()
    code, report, err = _doctor(manifest, env, "--no-rendezvous", "--bootstrap-peer", f"127.0.0.1:{ls.free_port()}",
                                "--timeout", "2")
    assert code == 9, (report, err[-2000:])
    assert report["verdict"] == "no_peers" and report["peers"] == []
    assert "--bootstrap-peer" in report["problems"][0]
    assert time.monotonic() - started < 30


def test_doctor_refuses_to_run_beside_a_daemon_of_its_own_node_id(tmp_path: Path) -> None:
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    env = ls.child_env(tmp_path / "home")
    from quinkgl_cli.node.dirlock import lock_directory

    held = lock_directory(tmp_path / "home" / "nodes" / "doc", "node state directory", "-")
    try:
        code, _report, err = _doctor(manifest, env, "--no-rendezvous", "--timeout", "2")
    finally:
        held.release()
    assert code == 7 and "stop it first" in err, err


def test_sigterm_ends_the_doctor_as_ctrl_c_does(tmp_path: Path) -> None:
    """SIGTERM ended the doctor by the signal's default (143 in a shell) where Ctrl-C gives 130 and `interrupted`."""
    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    log = tmp_path / "doctor.err"
    cmd = [sys.executable, "-m", "quinkgl_cli", "doctor", "--manifest", str(manifest), "--node-id", "doc",
           "--trust-policy", "tofu", "--no-rendezvous", "--bootstrap-peer", f"127.0.0.1:{ls.free_port()}",
           "--timeout", "120", "--log-level", "info"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ls.child_env(tmp_path / "home"))
    try:
        _wait_for(log, "transport-started", proc, 60)
        proc.terminate()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, log.read_text()[-2000:]
    assert log.read_text().strip().splitlines()[-1] == "interrupted by SIGTERM", log.read_text()[-2000:]
