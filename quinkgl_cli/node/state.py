"""A node's checkpoint state: the `NodeState` a checkpoint holds, built from the parts that own each piece, and the
random number generators' states (Python's, the node's own, NumPy's, torch's) as tensors and JSON.

Owns the layout: ``model.*``, ``optim.*`` and ``personal.*`` (the trainer and its personalization policy), ``aggregator.*``, ``sharing.*`` and ``topology.*`` (the
exchange), ``rng.*`` tensors; JSON meta with node and swarm id, the completed round, the sample count, the history
and run totals (the recorder), optimizer groups, the learning-rate scheduler's type and state (`node.lrschedule`),
topology JSON and RNG states. Never pickled
(`quinkgl_cli.node.checkpoint` writes it as safetensors).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from quinkgl_cli.strategies.base import Aggregator


@dataclass
class NodeState:
    """What a checkpoint holds: named tensors (safetensors) plus JSON-safe metadata. Never pickled."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def aggregator_tensors(aggregator: Aggregator) -> dict[str, torch.Tensor]:
    return {f"aggregator.{k}": v.detach().cpu().contiguous() for k, v in aggregator.state_dict().items()}


def load_aggregator(aggregator: Aggregator, tensors: dict[str, torch.Tensor]) -> None:
    aggregator.load_state_dict({k[len("aggregator."):]: v for k, v in tensors.items() if k.startswith("aggregator.")})


def rng_state(node_rng: random.Random) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process-wide generators' and the node's own generator's states as (``rng.*`` tensors, JSON)."""
    np_state = cast(tuple[Any, ...], np.random.get_state())
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))}
    meta = {
        "python": _py_rng_to_json(random.getstate()),
        "node": _py_rng_to_json(node_rng.getstate()),
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def load_rng_state(node_rng: random.Random, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what `rng_state` saved; a checkpoint without some of it leaves those generators as they are."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    if "python" in meta:
        random.setstate(_py_rng_from_json(meta["python"]))
    if "node" in meta:
        node_rng.setstate(_py_rng_from_json(meta["node"]))
    if "numpy" in meta and "rng.numpy" in tensors:
        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                             float(cached)))


def _py_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data: Sequence[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (int(version), tuple(int(v) for v in internal), gauss)


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer as (``<prefix><param>.<key>`` tensors, JSON of its param groups and non-tensor state)."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    sparse: dict[str, int] = {}  # sparse tensors' names and sparse dimensions
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                if value.layout == torch.sparse_coo:
                    # SGD's momentum buffer of an nn.Embedding(sparse=True): safetensors holds dense tensors only
                    # (saving one killed the daemon). Stored dense, made sparse again on load, as torch had it.
                    sparse[f"{idx}.{key}"] = value.sparse_dim()
                    value = value.to_dense()
                tensors[f"{prefix}{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = json_scalar(value)
    meta = {"param_groups": [{k: json_scalar(v) for k, v in g.items()} for g in opt["param_groups"]], "scalars": scalars}
    return tensors, {**meta, "sparse": sparse} if sparse else meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                         prefix: str) -> None:
    """Restore what `optimizer_state` saved under ``prefix``."""
    state: dict[int, dict[str, Any]] = {}
    sparse = meta.get("sparse", {})
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            dims = sparse.get(f"{idx}.{name}")
            state.setdefault(int(idx), {})[name] = value if dims is None else value.to_sparse(int(dims))
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def json_scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_scalar(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise ValueError(f"optimizer state value of type {type(value).__name__} cannot be checkpointed")
