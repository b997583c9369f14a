"""The operations parts on their own, fed fake snapshots: status socket, registry, Prometheus endpoint, metrics file,
report and the observer that fans snapshots out."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from quinkgl_cli.errors import IOFailure, NetworkError, UsageError
from quinkgl_cli.ops import registry
from quinkgl_cli.ops.exporter import MetricsExporter
from quinkgl_cli.ops.metrics_file import MetricsFile, read_metrics
from quinkgl_cli.ops.observer import OpsObserver, OpsSettings, open_observer
from quinkgl_cli.ops.report import plot_runs, summarize
from quinkgl_cli.ops.snapshot import Aggregation, DaemonSnapshot, PeerView, from_json
from quinkgl_cli.ops.status_client import ask, query
from quinkgl_cli.ops.status_server import StatusServer


def snap(round_: int = 3, **changes: object) -> DaemonSnapshot:
    base = DaemonSnapshot(
        node_id="peer-1", swarm_id="sha256:" + "ab" * 32, manifest="digits", pid=os.getpid(), state="running",
        listen="127.0.0.1:7001", started_at=1_700_000_000.0, updated_at=1_700_000_100.0 + round_, round=round_,
        rounds=10, peers=[PeerView("peer-2", "127.0.0.1:7002", 0.5)],
        last_aggregation=Aggregation(round_, ["peer-2"], 1_700_000_090.0), loss=0.5, accuracy=0.8, val_loss=0.6,
        val_accuracy=0.75 + round_ / 100, bytes_sent=1000 * round_, bytes_received=900 * round_, dp_epsilon_spent=None,
        round_metrics={"round": round_, "loss": 0.5, "val_accuracy": 0.75 + round_ / 100, "peers": 1,
                       "bytes_sent": 1000, "bytes_received": 900},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 107 bytes, and pytest's tmp paths can be long."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qgl") as d:
        yield Path(d)


# ---------------------------------------------------------------- snapshot
def test_snapshot_json_round_trip_keeps_nan_as_strict_json() -> None:
    s = snap(loss=float("nan"), round_metrics={"loss": float("inf")})
    text = json.dumps(s.to_json(), allow_nan=False)
    back = from_json(json.loads(text))
    assert math.isnan(back.loss or 0.0) and back.round_metrics == {"loss": "inf"}
    assert replace(back, loss=None) == replace(s, loss=None, round_metrics={"loss": "inf"})


@pytest.mark.parametrize("broken", [{"round": "three"}, {"state": "dancing"}, {"peers": [{"node_id": 1}]}])
def test_malformed_status_is_a_usage_error(broken: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="malformed daemon status"):
        from_json({**snap().to_json(), **broken})


# ---------------------------------------------------------------- registry
def test_runtime_dir_prefers_state_dir_then_home_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert registry.runtime_dir(tmp_path / "s") == tmp_path / "s" / "run"
    monkeypatch.setenv("QUINKGL_HOME", str(tmp_path / "home"))
    assert registry.runtime_dir() == tmp_path / "home" / "run"
    monkeypatch.delenv("QUINKGL_HOME")
    assert registry.runtime_dir() == tmp_path / "xdg" / "quinkgl"


def test_private_dir_is_narrowed_to_owner_only(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    registry.private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(IOFailure, match="not a directory"):
        registry.private_dir(tmp_path / "file")


def test_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IOFailure, match="longer than 107 bytes"):
        registry.socket_path(tmp_path / ("x" * 120))


# ---------------------------------------------------------------- status socket
def test_status_server_answers_with_latest_snapshot_owner_only(short_dir: Path) -> None:
    directory = short_dir / "run"
    server = StatusServer(directory)
    server.start()
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        (starting,) = query(directory)  # no snapshot yet: the daemon is still starting
        assert (starting.snapshot, starting.error) == (None, "starting")
        server.update(snap(3))
        server.update(snap(4))
        replies = query(directory)
        assert [r.snapshot for r in replies] == [snap(4)]
    finally:
        server.close()
    assert not server.path.exists() and query(directory) == []


def test_dead_daemon_socket_is_skipped_then_removed(short_dir: Path) -> None:
    directory = registry.private_dir(short_dir / "run")
    dead = directory / "999999.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(os.fspath(dead))  # bound, never listening, closed: what a kill -9 leaves
    assert ask(dead) is None and query(directory) == []

    server = StatusServer(directory)
    server.start()
    try:
        assert not dead.exists() and server.path.exists()
    finally:
        server.close()


def _as_nobody(path: Path) -> str:
    """Connect to ``path`` and read, in a forked child running as user nobody; what happened, as a word."""
    pid = os.fork()
    if pid == 0:  # the child: syscalls only, then _exit
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(os.fspath(path))
                code = 1 if conn.recv(100) else 0
        except PermissionError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "empty answer", 1: "read status", 2: "refused", 3: "failed"}[os.waitstatus_to_exitcode(status)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the socket as another user")
def test_another_user_cannot_read_the_status(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)  # only the status directory itself keeps others out
    server = StatusServer(short_dir / "run")
    server.start()
    server.update(snap())
    try:
        assert _as_nobody(server.path) == "refused"  # the 0700 directory and the 0600 socket
        os.chmod(short_dir / "run", 0o755)  # as if reached some other way: the peer credentials still refuse
        os.chmod(server.path, 0o666)
        assert _as_nobody(server.path) == "empty answer"
    finally:
        server.close()


# ---------------------------------------------------------------- Prometheus
def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_exporter_serves_the_latest_snapshot_on_loopback() -> None:
    exporter = MetricsExporter(0)
    exporter.start()
    try:
        host, port = exporter.address
        assert host == "127.0.0.1"
        assert "quinkgl_round" not in _scrape(port)  # nothing before the first snapshot
        exporter.update(snap(5, dp_epsilon_spent=1.5))
        got = _scrape(port)
        assert "quinkgl_dp_epsilon_remaining" not in got  # only privacy mode dp_sgd has a whole-run remainder
        exporter.update(snap(5, dp_epsilon_spent=1.5, round_metrics={"round": 5, "dp_epsilon_remaining": 6.5}))
        assert _scrape(port)["quinkgl_dp_epsilon_remaining"] == 6.5
    finally:
        exporter.close()
    assert got["quinkgl_round"] == 5 and got["quinkgl_round_target"] == 10 and got["quinkgl_known_peers"] == 1
    assert got["quinkgl_val_accuracy"] == pytest.approx(0.8) and got["quinkgl_sent_bytes_total"] == 5000
    assert got["quinkgl_dp_epsilon_spent"] == 1.5 and got["quinkgl_last_aggregation_round"] == 5
    assert got["quinkgl_info"] == 1


def test_exporter_port_in_use_and_bad_address_are_refused() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(NetworkError, match="--metrics-port"):
            MetricsExporter(busy.getsockname()[1]).start()
    with pytest.raises(UsageError, match="--metrics-listen"):
        MetricsExporter(0, "localhost:1")


# ---------------------------------------------------------------- metrics file and report
def test_metrics_file_appends_completed_rounds_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    for rounds in ((2, 3, 4), (4, 5, 6)):  # the second process resumed at round 4
        mf = MetricsFile(path)
        mf.start()
        for r in rounds:
            mf.update(snap(r))
        mf.update(snap(rounds[-1], state="finished"))  # the end state repeats the last round: no new line
        mf.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [3, 4, 5, 6]
    assert rows[0]["node"] == "peer-1" and rows[0]["val_accuracy"] == pytest.approx(0.78)
    (run,) = read_metrics(path)
    assert [r["round"] for r in run.rows] == [3, 4, 5, 6]


def test_read_metrics_skips_a_torn_last_line_and_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"ts":"x","node":"a","swarm":"s","round":1,"val_accuracy":0.5}\n{"ts":"x","node":"a","sw')
    assert [r["round"] for r in read_metrics(path)[0].rows] == [1]
    path.write_text('{"node":"a","swarm":"s","round":1}\nnot json\n')
    with pytest.raises(UsageError, match=r"m.jsonl:2 is not a JSON line"):
        read_metrics(path)
    path.write_text('{"node":"a","round":1}\n')
    with pytest.raises(UsageError, match="lacks node, swarm"):
        read_metrics(path)
    with pytest.raises(IOFailure):
        read_metrics(tmp_path / "missing.jsonl")


def test_report_summary_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    rows = [{"node": n, "swarm": "s", "round": r, "val_accuracy": 0.5 + r / 20 - (n == "b") * 0.1, "loss": 1 / r,
             "peers": 2, "bytes_sent": 100, "bytes_received": 90, "accuracy": "nan"} for n in "ab" for r in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = read_metrics(path)
    a = summarize(runs[0])
    assert (a.node, a.rounds, a.last_round, a.bytes_sent) == ("a", 5, 5, 500)
    assert a.final_val_accuracy == pytest.approx(0.75) and a.best_val_accuracy == pytest.approx(0.75)
    png = tmp_path / "curves.png"
    plot_runs(runs, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---------------------------------------------------------------- observer
class _Failing:
    def __init__(self) -> None:
        self.calls = 0

    def start(self) -> None:
        pass

    def update(self, snapshot: DaemonSnapshot) -> None:
        self.calls += 1
        raise IOFailure("disk full")

    def close(self) -> None:
        pass


def test_a_failing_output_is_reported_and_the_others_still_update(caplog: pytest.LogCaptureFixture) -> None:
    failing = _Failing()
    seen: list[DaemonSnapshot] = []

    class Recorder(_Failing):
        def update(self, snapshot: DaemonSnapshot) -> None:
            seen.append(snapshot)

    observer = OpsObserver({"broken": failing, "ok": Recorder()})
    with caplog.at_level(logging.WARNING, logger="quinkgl.ops"):
        observer.update(snap(1))
        observer.update(snap(2))
    assert failing.calls == 2 and [s.round for s in seen] == [1, 2]
    warned = [r for r in caplog.records if getattr(r, "qgl_event", None) == "ops-output-failed"]
    assert len(warned) == 2 and warned[0].qgl_fields == {"output": "broken", "error": "disk full"}  # type: ignore[attr-defined]


def test_open_observer_closes_what_it_started_when_a_later_output_fails(short_dir: Path) -> None:
    with pytest.raises(IOFailure, match="--metrics-file"):
        open_observer(OpsSettings(metrics_file=short_dir / "no" / "m.jsonl"), short_dir)
    assert registry.sockets(short_dir / "run") == []
    observer = open_observer(OpsSettings(metrics_port=0, metrics_file=short_dir / "m.jsonl"), short_dir)
    try:
        observer.update(snap(1))
        assert [r.snapshot for r in query(short_dir / "run")] == [snap(1)]
    finally:
        observer.close()
    assert registry.sockets(short_dir / "run") == []


def test_a_metrics_file_removed_with_its_directory_warns_once_and_is_made_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`rm -r` of the output folder mid-run: every later line went into the removed file without a word."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "m.jsonl"
    mf = MetricsFile(path)
    mf.start()
    mf.update(snap(1))
    mf.update(snap(2))
    path.unlink()
    folder.rmdir()
    with caplog.at_level(logging.WARNING, logger="quinkgl"):
        mf.update(snap(3))
        mf.update(snap(4))
        lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("output-lost ")]
        assert len(lost) == 1 and f"flag=--metrics-file path={path} " in lost[0], lost  # once, not per round
        folder.mkdir()
        mf.update(snap(5))
    mf.close()
    assert any(r.getMessage().startswith("output-reopened flag=--metrics-file") for r in caplog.records)
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [5]
