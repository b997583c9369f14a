"""Checkpoint files: round trip, pruning, fallback past damaged files, and crash safety under kill -9."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quinkgl_cli.errors import ExitCode, NodeConfigError
from quinkgl_cli.node.checkpoint import CheckpointStore, load_final_model, read_file, save_final_model
from quinkgl_cli.node.core import NodeState


def state(round_: int, swarm: str = "sha256:a", node: str = "n1") -> NodeState:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) * round_
    return NodeState(
        tensors={"model.w": w, "model.tied": w, "rng.torch": torch.get_rng_state()},
        meta={"round": round_, "swarm_id": swarm, "node_id": node, "sample_count": 10,
              "optimizer": {"param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0]}], "scalars": {"0": {"step": 3}}},
              "history": [{"loss": 0.5}, {"loss": float("nan")}]},
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


def _spoil(st: NodeState, how: str) -> NodeState:
    if how == "nan-weights":
        st.tensors["model.w"] = st.tensors["model.w"].clone()
        st.tensors["model.w"][0, 1] = float("nan")
    elif how == "inf-momentum":
        st.tensors["optim.0.momentum_buffer"] = torch.tensor([float("inf"), 0.0])
    elif how == "text-lr":
        st.meta["optimizer"]["param_groups"][0]["lr"] = "fast"
    elif how == "nan-lr":
        st.meta["optimizer"]["param_groups"][0]["lr"] = float("nan")
    elif how == "negative-round":
        st.meta["round"] = -7
    elif how == "bool-round":
        st.meta["round"] = True
    elif how == "other-node":
        st.meta["node_id"] = "n2"
    elif how == "other-swarm":
        st.meta["swarm_id"] = "sha256:b"
    elif how == "negative-samples":
        st.meta["sample_count"] = -1
    return st


@pytest.mark.parametrize(
    "how, reason",
    [
        ("nan-weights", "tensor model.w holds NaN or Inf"),
        ("inf-momentum", "tensor optim.0.momentum_buffer holds NaN or Inf"),
        ("text-lr", "lr 'fast', not a finite number"),
        ("nan-lr", "lr nan, not a finite number"),
        ("negative-round", "round -7 is not a non-negative integer"),
        ("bool-round", "round True is not"),
        ("other-node", "belongs to node 'n2', not 'n1'"),
        ("other-swarm", "belongs to swarm sha256:b, not sha256:a"),
        ("negative-samples", "sample_count -1"),
    ],
)
def test_resume_skips_a_bad_newest_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, reason: str) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(state(1))
    store.save(state(2))
    store.write(3, CheckpointStore.encode(_spoil(state(3), how)))
    with caplog.at_level(logging.WARNING, logger="quinkgl.checkpoint"):
        f, st = store.resume_point("sha256:a", "n1")  # type: ignore[misc]
    assert f.round == 2 and st.meta["round"] == 2
    skipped = [r for r in caplog.records if getattr(r, "qgl_event", "") == "checkpoint-invalid"]
    assert len(skipped) == 1 and reason in skipped[0].qgl_fields["reason"]  # type: ignore[attr-defined]
    # Every checkpoint bad: refused with exit 7 and the newest's reason, never a silent start from round 0.
    only_bad = CheckpointStore(tmp_path / "bad")
    only_bad.write(3, CheckpointStore.encode(_spoil(state(3), how)))
    with pytest.raises(NodeConfigError, match="no checkpoint in .* can be resumed") as err:
        only_bad.resume_point("sha256:a", "n1")
    assert err.value.code == ExitCode.NODE and reason in err.value.message and "--no-resume" in err.value.one_line()


def test_resume_point_reads_a_good_checkpoint_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.resume_point("sha256:a", "n1") is None  # nothing there: a fresh start, no error
    store.save(state(4))
    f, st = store.resume_point("sha256:a", "n1")  # type: ignore[misc]
    assert f.round == 4 and st.meta["optimizer"]["param_groups"][0]["lr"] == 0.05
    assert math.isnan(st.meta["history"][1]["loss"])  # a NaN in the metrics history is a record, not a defect


def test_resume_skips_a_fifo_and_truncated_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, keep=9)
    store.save(state(1))
    cut = store.save(state(2))
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    os.mkfifo(tmp_path / "ckpt-00000009-r9.safetensors")  # opening it would block start-up forever
    (tmp_path / "ckpt-00000008-r8.safetensors").symlink_to(store.files()[0].path)
    with caplog.at_level(logging.WARNING, logger="quinkgl.checkpoint"):
        f, _ = store.resume_point("sha256:a", "n1")  # type: ignore[misc]
    assert f.round == 1
    reasons = [r.qgl_fields["reason"] for r in caplog.records if getattr(r, "qgl_event", "") == "checkpoint-unreadable"]  # type: ignore[attr-defined]
    assert reasons[:2] == ["not a regular file", "not a regular file"] and reasons[2].startswith("unreadable")
    store.files()[0].path.write_bytes(b"\0" * 10)  # now every file is bad
    with pytest.raises(NodeConfigError, match=r"\(4 skipped; newest ckpt-00000009-r9.safetensors: unreadable\)"):
        store.resume_point("sha256:a", "n1")


def test_final_model_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    save_final_model(tmp_path / "final_model.safetensors", model, {"round": 3, "swarm_id": "sha256:a"})
    assert oct((tmp_path / "final_model.safetensors").stat().st_mode & 0o777) == "0o600"  # like the checkpoints
    tensors, meta = load_final_model(tmp_path / "final_model.safetensors")
    assert meta["round"] == 3 and torch.equal(tensors["weight"], model.weight.detach())
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "final_model.safetensors"))) == {"weight", "bias"}


WRITER = """
import sys, torch
from pathlib import Path
from quinkgl_cli.errors import ExitCode, NodeConfigError
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
