"""The trace format (`quinkgl_cli.node.trace`): records survive a round trip; bad files fail naming the line; the
daemon's writer (`quinkgl_cli.node.tracer`) appends sessions and refuses files that are not its own."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quinkgl_cli.errors import ExitCode, IOFailure, UsageError
from quinkgl_cli.node.metrics import RoundMetrics
from quinkgl_cli.node.trace import (
    Header,
    NodeStart,
    NodeStop,
    PeerArrival,
    PeerDeparture,
    Train,
    Transfer,
    encode_record,
    parse_line,
    read_trace,
    sessions,
)
from quinkgl_cli.node.tracer import Tracer
from quinkgl_cli.transport.base import TransferDone

HEADER = Header(swarm="sha256:" + "ab" * 32, node="peer-1", started_at=datetime(2026, 12, 3, 15, 0, tzinfo=UTC), torch_threads=1)
EVENTS = [
    NodeStart(t=0.0, round=0),
    PeerArrival(t=0.5, peer="peer-2"),
    Train(t=1.25, round=1, seconds=1.1, samples=360),
    Transfer(t=1.5, direction="send", peer="peer-2", round=1, bytes=40_000, seconds=0.02, path="direct", ok=True),
    Transfer(t=1.6, direction="receive", peer="peer-2", round=1, bytes=1_000, seconds=0.3, path="relay", ok=False),
    PeerDeparture(t=9.0, peer="peer-2"),
    NodeStop(t=10.0, round=1, reason="finished"),
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_round_trip_keeps_every_record_and_its_type(tmp_path: Path) -> None:
    records = [HEADER, *EVENTS]
    path = write(tmp_path / "a.trace", [encode_record(r) for r in records])
    assert read_trace(path) == records
    [session] = sessions(read_trace(path))
    assert session.header.node == "peer-1" and session.header.started_at == HEADER.started_at
    assert [type(e) for e in session.events] == [type(e) for e in EVENTS]


def test_concatenated_traces_split_into_sessions(tmp_path: Path) -> None:
    other = Header(swarm=HEADER.swarm, node="peer-2", started_at=HEADER.started_at, torch_threads=None)
    lines = [encode_record(r) for r in (HEADER, *EVENTS, other, NodeStart(t=0, round=0))]
    got = sessions(read_trace(write(tmp_path / "s.trace", lines)))
    assert [s.header.node for s in got] == ["peer-1", "peer-2"]
    assert [len(s.events) for s in got] == [len(EVENTS), 1]


def test_a_line_is_one_json_object(tmp_path: Path) -> None:
    line = encode_record(EVENTS[3])
    assert line.endswith("\n") and line.count("\n") == 1 and line.startswith('{"kind":"transfer"')


def test_a_train_record_without_evaluation_and_saving_times_reads_them_as_zero() -> None:
    old = parse_line('{"kind":"train","t":1,"round":1,"seconds":1.5,"samples":3}')
    assert isinstance(old, Train) and (old.eval_seconds, old.save_seconds) == (0.0, 0.0)


@pytest.mark.parametrize(("bad", "names"), [
    ("not json", "json"),
    ('{"kind":"train","t":1,"round":1,"seconds":-1,"samples":3}', "seconds"),
    ('{"kind":"train","t":1,"round":1,"seconds":1,"samples":3,"extra":1}', "extra"),
    ('{"kind":"landing","t":1}', "kind"),
    ('{"kind":"transfer","t":1,"direction":"sideways","peer":"p","round":1,"bytes":1,"seconds":1,"path":"direct","ok":true}',
     "direction"),
    ('{"kind":"train","t":"soon","round":1,"seconds":1,"samples":3}', "t"),
])
def test_a_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path: Path, bad: str, names: str) -> None:
    path = write(tmp_path / "bad.trace", [encode_record(HEADER), encode_record(EVENTS[0]), bad + "\n", encode_record(EVENTS[1])])
    with pytest.raises(UsageError) as caught:
        read_trace(path)
    message = caught.value.one_line()
    assert f"{path}:3:" in message and names in message.lower() and "\n" not in message
    assert caught.value.code == ExitCode.USAGE


def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    line = encode_record(HEADER).replace('"version":1', '"version":2')
    with pytest.raises(UsageError, match=r":1: .*version"):
        read_trace(write(tmp_path / "v2.trace", [line]))


def test_a_trace_must_start_with_its_header(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"headless.trace:1: a trace starts with a header"):
        read_trace(write(tmp_path / "headless.trace", [encode_record(EVENTS[0])]))


def test_a_cut_last_line_is_skipped_but_an_empty_file_is_refused(tmp_path: Path) -> None:
    cut = encode_record(EVENTS[2])[:20]
    assert read_trace(write(tmp_path / "cut.trace", [encode_record(HEADER), cut])) == [HEADER]
    with pytest.raises(UsageError, match="no trace records"):
        read_trace(write(tmp_path / "empty.trace", []))


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin.trace"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="not a UTF-8 trace"):
        read_trace(path)


# ---------------------------------------------------------------- the daemon's writer
def test_tracer_writes_a_session_and_a_restart_appends_another(tmp_path: Path) -> None:
    path = tmp_path / "peer-1.trace"
    for run in (1, 2):
        tracer = Tracer.open(path, HEADER.swarm, "peer-1", torch_threads=2)
        tracer.node_started(run - 1)
        tracer.arrived("peer-2")
        tracer.arrived("peer-2")  # told again (a second hello): one arrival
        tracer.transfer(TransferDone("receive", "peer-2", run, 10_088, 0.0123456789, "direct", True))
        tracer.round_trained(RoundMetrics(round=run, train_time=0.25, eval_time=0.03, samples=480), 0.125)
        tracer.departed("peer-2")
        tracer.departed("peer-2")
        tracer.node_stopped(run, "signal" if run == 1 else "finished")
        tracer.transfer(TransferDone("send", "peer-2", run, 1, 0.1, "direct", False))  # after the stop: no session's
    got = sessions(read_trace(path))
    assert [(s.header.node, s.header.torch_threads) for s in got] == [("peer-1", 2), ("peer-1", 2)]
    assert [[e.kind for e in s.events] for s in got] == [
        ["node-start", "peer-arrival", "transfer", "train", "peer-departure", "node-stop"]] * 2
    transfer = got[1].events[2]
    assert isinstance(transfer, Transfer) and (transfer.round, transfer.bytes, transfer.seconds) == (2, 10_088, 0.012346)
    assert [s.events[-1] for s in got][1].round == 2
    train = got[1].events[3]  # what the round loop waited for besides training: a replay charges it too
    assert isinstance(train, Train) and (train.seconds, train.eval_seconds, train.save_seconds) == (0.25, 0.03, 0.125)


def test_tracer_refuses_other_files_and_other_nodes_traces(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(UsageError, match="exists and is not a trace file"):
        Tracer.open(notes, HEADER.swarm, "peer-1", None)
    assert notes.read_text() == "mine\n"
    with pytest.raises(UsageError, match="is not a file"):
        Tracer.open(tmp_path, HEADER.swarm, "peer-1", None)
    theirs = write(tmp_path / "theirs.trace", [encode_record(HEADER)])
    with pytest.raises(UsageError, match="holds node peer-1's trace"):
        Tracer.open(theirs, HEADER.swarm, "peer-9", None)
    with pytest.raises(UsageError, match="holds node peer-1's trace"):
        Tracer.open(theirs, "sha256:" + "cd" * 32, "peer-1", None)
    with pytest.raises(IOFailure) as caught:
        Tracer.open(tmp_path / "missing" / "x.trace", HEADER.swarm, "peer-1", None)
    assert caught.value.code == ExitCode.IO


def test_a_write_failing_in_a_transport_callback_stops_the_daemon_at_its_next_write(tmp_path: Path) -> None:
    tracer = Tracer.open(tmp_path / "t.trace", HEADER.swarm, "peer-1", None)
    tracer.close()
    tracer._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail as on a full or vanished disk
    try:
        tracer.arrived("peer-2")  # the transport's callback: must not raise into the transport
        with pytest.raises(IOFailure, match="cannot append to --trace"):
            tracer.round_trained(RoundMetrics(round=1), 0.0)
    finally:
        tracer.close()
