"""Checkpoint files: round trip, pruning, fallback past damaged files, and crash safety under kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quinkgl_cli.node.checkpoint import CheckpointStore, load_final_model, read_file, save_final_model
from quinkgl_cli.node.core import NodeState


def state(round_: int, swarm: str = "sha256:a") -> NodeState:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) * round_
    return NodeState(
        tensors={"model.w": w, "model.tied": w, "rng.torch": torch.get_rng_state()},
        meta={"round": round_, "swarm_id": swarm, "optimizer": {"param_groups": [], "scalars": {}}, "history": [{"loss": 0.5}]},
    )


def test_roundtrip_and_prune(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck", keep=2)
    assert store.latest() is None
    for r in range(1, 5):
        store.save(state(r))
    files = store.files()
    assert [f.round for f in files] == [3, 4]
    f, st = store.latest()
    assert f.round == 4 and st.meta["round"] == 4 and st.meta["swarm_id"] == "sha256:a"
    assert torch.equal(st.tensors["model.w"], state(4).tensors["model.w"]) and torch.equal(st.tensors["model.tied"], st.tensors["model.w"])
    assert oct((tmp_path / "ck").joinpath(f.path.name).stat().st_mode & 0o777) == "0o600"


def test_sequence_grows_across_restarts_so_newest_wins(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(state(7, swarm="sha256:old"))
    store.save(state(1, swarm="sha256:new"))  # a --no-resume run starts over at round 1
    f, st = store.latest()
    assert f.round == 1 and st.meta["swarm_id"] == "sha256:new"


def test_damaged_newest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(state(1))
    bad = store.save(state(2))
    bad.write_bytes(bad.read_bytes()[:40])
    f, st = store.latest()
    assert f.round == 1
    assert any("checkpoint-unreadable" in r.getMessage() for r in caplog.records)


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    import pickle

    evil = tmp_path / "ckpt-00000001-r1.safetensors"
    evil.write_bytes(pickle.dumps({"round": 1}))
    with pytest.raises(ValueError):
        read_file(evil)
    assert CheckpointStore(tmp_path).latest() is None


def test_final_model_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    save_final_model(tmp_path / "final_model.safetensors", model, {"round": 3, "swarm_id": "sha256:a"})
    tensors, meta = load_final_model(tmp_path / "final_model.safetensors")
    assert meta["round"] == 3 and torch.equal(tensors["weight"], model.weight.detach())
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "final_model.safetensors"))) == {"weight", "bias"}


WRITER = """
import sys, torch
from pathlib import Path
from quinkgl_cli.node.checkpoint import CheckpointStore
from quinkgl_cli.node.core import NodeState
store = CheckpointStore(Path(sys.argv[1]), keep=2)
big = torch.randn(400_000)
r = 0
while True:
    r += 1
    store.save(NodeState({"model.w": big * r}, {"round": r, "swarm_id": "s", "optimizer": {}}))
    print(r, flush=True)
"""


def test_kill_9_while_writing_never_leaves_latest_unreadable(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ck = tmp_path / "ck"
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(ck)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        target = 2 + attempt
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or int(line) >= target:
                break
        time.sleep(0.003 * attempt)  # land the kill at different points of the next write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        got = CheckpointStore(ck, keep=2).latest()
        assert got is not None
        f, st = got
        assert st.meta["round"] == f.round >= 1
        assert st.tensors["model.w"].numel() == 400_000
    CheckpointStore(ck, keep=2).prune()
    assert not list(ck.glob(".*.tmp"))
