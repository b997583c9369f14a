"""Checkpoints: one self-contained safetensors file per save, written atomically, newest few kept.

File ``ckpt-<seq>-r<round>.safetensors`` in the checkpoint directory holds every tensor of a `NodeState` (model,
optimizer state, aggregator state, RNG states) and, in the safetensors header's string metadata, the JSON part
(round, swarm id, node id, metrics history, optimizer param groups, topology state, python RNG state). Loading
parses JSON and raw tensor bytes only: no pickle, no code runs.

Why this layout:
- one file per checkpoint, written temp + fsync + rename (`atomic_write_bytes`): ``kill -9`` at any moment leaves
  either the previous set of files or the previous set plus one complete new file, never a torn latest one;
- ``seq`` grows across runs, so the newest checkpoint is the highest ``seq`` even after ``--no-resume`` restarts a
  directory at round 1; no separate ``latest`` pointer exists that could disagree with the files;
- a file that still fails to load (disk trouble) is skipped with a warning and the next newest is used.

Resuming (`CheckpointStore.resume_point`) trusts nothing in a file: it must be a regular file (a FIFO would block
the open forever), load, belong to this swarm and this node, name the round its file name says, and hold finite
tensors and well-typed optimizer settings (`check_state`). A file that fails is logged (``checkpoint-unreadable``
or ``checkpoint-invalid``) and the next newest is tried; when files exist but none passes, resuming is refused
(exit 7) rather than silently starting again from round 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import IOFailure, NodeConfigError
from quinkgl_cli.events import emit
from quinkgl_cli.node.state import NodeState

log = logging.getLogger("quinkgl.checkpoint")

FORMAT = "quinkgl-checkpoint/1"
FINAL_FORMAT = "quinkgl-model/1"
FINAL_MODEL_NAME = "final_model.safetensors"
_NAME = re.compile(r"^ckpt-(\d{8})-r(\d+)\.safetensors$")


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    seq: int
    round: int


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights, views): copy the repeats, keep the rest."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or not t.is_contiguous() or t.storage_offset() != 0 or t.numel() * t.element_size() != key[1]:
            t = t.contiguous().clone()
        else:
            seen.add(key)
        out[name] = t
    return out


def serialize(tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str = FORMAT) -> bytes:
    text = json.dumps(meta, separators=(",", ":"), allow_nan=True)
    return st_save(_unshared(tensors), metadata={"format": fmt, "state": text})


def read_file(path: Path, fmt: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint or model file; ValueError when it is not one (or not a regular file)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise ValueError(f"unreadable: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != fmt:
                raise ValueError(f"not a {fmt} file (format {header.get('format')!r})")
            meta = json.loads(header["state"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable: {exc}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"unreadable: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return tensors, meta


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, dict):
        raise ValueError("optimizer metadata is not an object")
    groups = optimizer.get("param_groups", [])
    scalars = optimizer.get("scalars", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("optimizer param_groups is not a list of objects")
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise ValueError("optimizer scalars is not an object of objects")
    for i, group in enumerate(groups):
        if "lr" in group and not (_is_number(group["lr"]) and group["lr"] >= 0):
            raise ValueError(f"optimizer group {i} has lr {group['lr']!r}, not a finite number >= 0")
        for key, value in group.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"optimizer group {i} has {key} {value}")
    for idx, values in scalars.items():
        if not idx.isdigit():
            raise ValueError(f"optimizer scalars has key {idx!r}, not a parameter index")
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"optimizer state {idx}.{key} is {value}")


def check_state(f: CheckpointFile, state: NodeState, swarm_id: str, node_id: str) -> None:
    """Refuse (ValueError, one line) a checkpoint this node must not resume from.

    Its swarm and node must be ours (another node's checkpoint of the same swarm would make two peers one), its
    round a non-negative integer equal to the file name's, its optimizer settings numbers, and every floating-point
    tensor finite: a NaN weight or momentum would make the first training step fail, after the resume was
    announced. The node checks shapes against its model when it loads the state."""
    meta = state.meta
    if meta.get("swarm_id") != swarm_id:
        raise ValueError(f"belongs to swarm {meta.get('swarm_id')}, not {swarm_id}")
    if meta.get("node_id") != node_id:
        raise ValueError(f"belongs to node {meta.get('node_id')!r}, not {node_id!r}")
    round_ = meta.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise ValueError(f"round {round_!r} is not a non-negative integer")
    if round_ != f.round:
        raise ValueError(f"holds round {round_}, its file name says {f.round}")
    sample_count = meta.get("sample_count", 0)
    if not isinstance(sample_count, int) or isinstance(sample_count, bool) or sample_count < 0:
        raise ValueError(f"sample_count {sample_count!r} is not a non-negative integer")
    if not isinstance(meta.get("history", []), list):
        raise ValueError("history is not a list")
    _check_optimizer(meta.get("optimizer"))
    for name, t in state.tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name} holds NaN or Inf")


class CheckpointStore:
    """The checkpoints of one node in one directory."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        if keep < 1:
            raise NodeConfigError(f"--keep-checkpoints {keep} must be at least 1")
        self.directory = Path(directory)
        self.keep = keep

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IOFailure(f"cannot create checkpoint directory {self.directory}: {exc.strerror}",
                            "pass a writable --checkpoint-dir") from exc

    def files(self) -> list[CheckpointFile]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append(CheckpointFile(p, int(m.group(1)), int(m.group(2))))
        return sorted(found, key=lambda f: f.seq)

    def save(self, state: NodeState) -> Path:
        return self.write(int(state.meta["round"]), self.encode(state))

    @staticmethod
    def encode(state: NodeState) -> bytes:
        """The checkpoint file's bytes: a snapshot, so the caller may keep training while `write` runs."""
        return serialize(state.tensors, {**state.meta, "format": FORMAT})

    def write(self, round_: int, data: bytes) -> Path:
        """Write encoded checkpoint bytes atomically as the newest checkpoint, then prune old ones."""
        self._ensure_dir()
        existing = self.files()
        seq = existing[-1].seq + 1 if existing else 1
        path = self.directory / f"ckpt-{seq:08d}-r{round_}.safetensors"
        atomic_write_bytes(path, data, mode=0o600)
        self.prune()
        return path

    def prune(self) -> None:
        """Keep the newest ``keep`` checkpoints; remove temp files a killed writer left behind."""
        for tmp in self.directory.glob(".ckpt-*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
        files = self.files()
        for old in files[: max(len(files) - self.keep, 0)]:
            try:
                old.path.unlink()
            except OSError as exc:
                emit(log, logging.WARNING, "checkpoint-prune-failed", path=old.path, error=exc.strerror)

    def _read(self, f: CheckpointFile) -> NodeState | None:
        """The file's state, or None after logging why it is unreadable."""
        try:
            tensors, meta = read_file(f.path)
            for key in ("round", "swarm_id", "optimizer"):
                if key not in meta:
                    raise ValueError(f"metadata lacks {key!r}")
        except ValueError as exc:
            emit(log, logging.WARNING, "checkpoint-unreadable", path=f.path, reason=str(exc)[:200])
            return None
        return NodeState(tensors=tensors, meta=meta)

    def latest(self) -> tuple[CheckpointFile, NodeState] | None:
        """The newest checkpoint that loads, whoever wrote it; unreadable ones are reported and skipped."""
        for f in reversed(self.files()):
            state = self._read(f)
            if state is not None:
                return f, state
        return None

    def resume_point(self, swarm_id: str, node_id: str) -> tuple[CheckpointFile, NodeState] | None:
        """The newest checkpoint this node may resume from (`check_state`); the ones that fail are logged and
        skipped. None when the directory holds no checkpoint at all; NodeConfigError (exit 7) when it holds some
        but none is usable: starting again from round 0 is then the user's decision (``--no-resume``)."""
        files = self.files()
        newest_reason = ""
        for f in reversed(files):
            state = self._read(f)
            if state is None:
                newest_reason = newest_reason or "unreadable"
                continue
            try:
                check_state(f, state, swarm_id, node_id)
            except ValueError as exc:
                emit(log, logging.WARNING, "checkpoint-invalid", path=f.path, reason=str(exc)[:200])
                newest_reason = newest_reason or str(exc)[:200]
                continue
            return f, state
        if not files:
            return None
        raise NodeConfigError(
            f"no checkpoint in {self.directory} can be resumed ({len(files)} skipped; newest "
            f"{files[-1].path.name}: {newest_reason})",
            "pass --no-resume to start from round 0 (the files are kept), or another --checkpoint-dir",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_final_model(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """The trained model's full state_dict as plain safetensors (loadable by `safetensors.torch.load_file`)."""
    tensors = {k: v for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), serialize(tensors, meta, fmt=FINAL_FORMAT), mode=0o600)


def load_final_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return read_file(path, fmt=FINAL_FORMAT)
