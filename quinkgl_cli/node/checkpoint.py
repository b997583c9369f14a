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
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from quinkgl_cli.atomic import atomic_write_bytes
from quinkgl_cli.errors import IOFailure, NodeConfigError
from quinkgl_cli.node.core import NodeState
from quinkgl_cli.node.logs import kv

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
    """Tensors and metadata of a checkpoint or model file; ValueError when it is not one."""
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
                log.warning("checkpoint-prune-failed %s", kv(path=old.path, error=exc.strerror))

    def latest(self) -> tuple[CheckpointFile, NodeState] | None:
        """The newest checkpoint that loads; unreadable ones are reported and skipped."""
        for f in reversed(self.files()):
            try:
                tensors, meta = read_file(f.path)
                for key in ("round", "swarm_id", "optimizer"):
                    if key not in meta:
                        raise ValueError(f"metadata lacks {key!r}")
            except ValueError as exc:
                log.warning("checkpoint-unreadable %s", kv(path=f.path, reason=str(exc)[:200]))
                continue
            return f, NodeState(tensors=tensors, meta=meta)
        return None


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
    atomic_write_bytes(Path(path), serialize(tensors, meta, fmt=FINAL_FORMAT))


def load_final_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return read_file(path, fmt=FINAL_FORMAT)
