"""`quinkgl run --trace FILE` on real daemons talking IPv8 on loopback: each writes its own session as it runs.

One 3-peer swarm; in the same test, while the swarm runs, the refusals of a file that cannot be a trace (checked
in-process: start-up stops before any directory is made).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.trace import NodeStart, NodeStop, PeerArrival, Train, Transfer, read_trace, sessions
from tests.test_cli_ops import run_cli

pytestmark = pytest.mark.e2e

ROUNDS = 4
INTERVAL = 0.8
# The digits MLP 64-32-10 in float32, and what the tensor container may add around it (header, alignment).
MODEL_BYTES = (64 * 32 + 32 + 32 * 10 + 10) * 4
CONTAINER_SLACK = 4096


def _refusals(tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = Path(tempfile.mkdtemp(prefix="qgl", dir="/tmp"))  # short: the status socket's path must fit 107 bytes
    base = ["run", "--manifest", str(manifest), "--script", str(ls.DIGITS_SCRIPT), "--trust-policy", "open",
            "--state-dir", str(state), "--port", "0"]
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    cases = [(other, 1, "exists and is not a trace file"), (tmp_path / "no" / "dir" / "x.trace", 2, "dir does not exist")]
    for path, code, message in cases:
        ck = tmp_path / f"ck-{code}"
        got, _, err = run_cli([*base, "--checkpoint-dir", str(ck), "--trace", str(path)], capsys)
        assert got == code and message in err and len(err.splitlines()) == 1, err
        assert not ck.exists()
    assert other.read_text() == "my notes\n"
    shutil.rmtree(state)


def test_each_daemon_traces_training_transfers_and_arrivals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, _key, _pub, swarm_id = ls.digits_manifest(tmp_path / "m")
    traces = tmp_path / "traces"
    traces.mkdir()
    peers = ls.start_swarm(tmp_path, manifest, 3, ROUNDS, INTERVAL, "shards:3",
                           extra_for=lambda name: ["--trace", str(traces / f"{name}.trace")])
    try:
        _refusals(tmp_path, manifest, capsys)
        codes = ls.wait_all(peers, timeout=180)
    finally:
        ls.stop_all(peers)
    assert codes == [0, 0, 0], {p.name: p.text()[-2000:] for p in peers}
    names = {p.name for p in peers}
    sent: dict[tuple[str, str, int], int] = {}  # (sender, recipient, round) -> bytes, as the sender saw it
    received: dict[tuple[str, str, int], int] = {}
    for p in peers:
        (session,) = sessions(read_trace(traces / f"{p.name}.trace"))
        assert (session.header.node, session.header.swarm, session.header.torch_threads) == (p.name, swarm_id, 1)
        events = session.events
        # The round loop (node-start) waits for the others (--min-peers); a faster peer's update may come meanwhile.
        (start,) = [e for e in events if isinstance(e, NodeStart)]
        before = events[:events.index(start)]
        assert start.round == 0 and all(isinstance(e, PeerArrival | Transfer) for e in before)
        assert {e.peer for e in before if isinstance(e, PeerArrival)} == names - {p.name}
        assert isinstance(events[-1], NodeStop) and (events[-1].round, events[-1].reason) == (ROUNDS, "finished")
        times = [e.t for e in events]
        assert times == sorted(times)
        trained = [e for e in events if isinstance(e, Train)]
        assert [e.round for e in trained] == list(range(1, ROUNDS + 1))
        assert all(e.seconds > 0 and e.samples > 0 for e in trained)
        # what the round loop waited for besides training: the evaluation, the checkpoint it writes every round
        assert all(e.eval_seconds > 0 and e.save_seconds > 0 for e in trained)
        assert {e.peer for e in events if isinstance(e, PeerArrival)} == names - {p.name}
        by_peer: dict[str, int] = defaultdict(int)
        for e in events:
            if isinstance(e, Transfer) and e.ok:
                assert e.path == "direct" and e.seconds >= 0 and e.peer in names - {p.name}
                assert MODEL_BYTES < e.bytes < MODEL_BYTES + CONTAINER_SLACK, e
                key = (p.name, e.peer, e.round) if e.direction == "send" else (e.peer, p.name, e.round)
                (sent if e.direction == "send" else received)[key] = e.bytes
                by_peer[e.peer] += e.direction == "receive"
        # A loaded machine may miss a round's update, never most of them.
        assert all(by_peer[q] >= ROUNDS // 2 for q in names - {p.name}), (p.name, dict(by_peer))
    both = set(sent) & set(received)
    assert len(both) >= len(received) // 2 and all(sent[k] == received[k] for k in both)
