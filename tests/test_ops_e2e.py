"""Operating real daemons: two `quinkgl run` processes on loopback with JSON logs, status sockets, a Prometheus
endpoint, metrics files and a rotated log file; one of them loses the reader of its stdout pipe early on."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.node import localswarm as ls

pytestmark = pytest.mark.e2e

ROUNDS = 10  # the daemons outlive the status and scrape checks made after their round 2, on a loaded machine too
INTERVAL = 0.5


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qgl") as d:  # short: the status sockets' paths must fit 107 bytes
        yield Path(d)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _status(state_dir: Path) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "quinkgl_cli", "status", "--state-dir", str(state_dir), "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_status_metrics_and_json_logs_of_running_daemons(tmp_path: Path, state_dir: Path) -> None:
    manifest, _key, _pub, swarm_id = ls.digits_manifest(tmp_path / "m")
    ports = [ls.free_port(), ls.free_port()]
    env = ls.child_env(tmp_path / "home")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files = {}
    for i, name in enumerate(("peer-1", "peer-2")):
        files[name] = {k: tmp_path / f"{name}.{k}" for k in ("out", "err", "metrics", "log")}
        extra = ["--log-format", "json", "--state-dir", str(state_dir), "--metrics-port", "0",
                 "--metrics-file", str(files[name]["metrics"]), "--log-file", str(files[name]["log"]),
                 "--log-max-bytes", "4000", "--log-backups", "2", "--min-peers", "1"]
        cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ports[i], ROUNDS, INTERVAL, [ports[1 - i]],
                             tmp_path / "ckpt" / name, {"shard": str(i), "num_shards": "2"}, extra)
        with open(files[name]["err"], "wb") as err:
            if name == "peer-1":
                with open(files[name]["out"], "wb") as out:
                    procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)
            else:  # its stdout is a pipe this test stops reading: `tee` killed
                procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path)
    try:
        piped = procs["peer-2"].stdout
        assert piped is not None
        first = json.loads(piped.readline())  # the daemon is writing JSON: then its reader goes away
        piped.close()
        assert first["node"] == "peer-2"

        def both_running() -> list[dict[str, Any]] | None:
            found = _status(state_dir)
            assert all(s.get("error") in (None, "starting") for s in found), found
            ok = len(found) == 2 and all(s.get("round", 0) >= 2 and len(s["peers"]) == 1 for s in found)
            return found if ok else None

        seen = {s["node_id"]: s for s in wait_for(both_running, 240, "both daemons past round 2 in `quinkgl status`")}
        assert set(seen) == {"peer-1", "peer-2"}
        one = seen["peer-1"]
        assert one["state"] == "running" and one["swarm_id"] == swarm_id and one["rounds"] == ROUNDS
        assert one["listen"] == f"127.0.0.1:{ports[0]}" and one["peers"][0]["node_id"] == "peer-2"
        assert one["peers"][0]["address"] == f"127.0.0.1:{ports[1]}" and one["bytes_sent"] > 0
        assert one["last_aggregation"] is not None and one["val_accuracy"] is not None

        listening = wait_for(lambda: [e for e in _json_lines(files["peer-1"]["out"]) if e["event"] == "metrics-listening"],
                             60, "the metrics endpoint's address")
        host, port = listening[0]["address"].split(":")
        assert host == "127.0.0.1"

        errors: list[OSError] = []

        def scrape() -> str | None:
            try:  # a daemon loaded by the other tests can be slow to answer; it is running (checked above)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
                    return str(resp.read().decode())
            except OSError as exc:
                errors.append(exc)
                return None

        scraped = None
        deadline = time.monotonic() + 60
        while scraped is None and time.monotonic() < deadline:
            scraped = scrape()
            if scraped is None:
                time.sleep(0.05)
        assert scraped is not None, f"no scrape of peer-1's /metrics within 60 s: {errors[-3:]}"
        assert f'quinkgl_round{{node="peer-1",swarm="{swarm_id}"}}' in scraped
        assert "quinkgl_sent_bytes_total" in scraped and "quinkgl_known_peers" in scraped

        codes = {name: p.wait(timeout=240) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = {name: f["err"].read_text() for name, f in files.items()}
    assert codes == {"peer-1": 0, "peer-2": 0}, errs
    for name in procs:
        assert "Traceback" not in errs[name] and "BrokenPipe" not in errs[name], errs[name][-2000:]
        rows = _json_lines(files[name]["metrics"])  # peer-2 kept training after its stdout reader left
        assert [(r["round"], r.get("phase")) for r in rows] == [*((r, None) for r in range(1, ROUNDS + 1)),
                                                                (ROUNDS, "final-consensus")]
        assert all(r["node"] == name and r["swarm"] == swarm_id for r in rows)
        logs = sorted(tmp_path.glob(f"{name}.log*"))
        assert 1 < len(logs) <= 3 and all(f.stat().st_size <= 4000 for f in logs)
        assert all(isinstance(e["event"], str) for f in logs for e in _json_lines(f))
    events = _json_lines(files["peer-1"]["out"])  # every stdout line is JSON, the script's prints included
    printed = [e["text"] for e in events if e["event"] == "script-output"]
    assert any(t.startswith("[peer-discovered] peer-2") for t in printed)
    assert sum(t.startswith("round=") for t in printed) >= ROUNDS - 1
    assert events[-1]["event"] == "finished"
    # The status sockets went with their daemons.
    assert _status(state_dir) == []
